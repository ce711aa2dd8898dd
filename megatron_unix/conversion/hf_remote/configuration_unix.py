"""Uni-X configs for Hugging Face remote code (copied verbatim into exported checkpoints).

The classes keep the base `model_type` ("qwen3" / "qwen2") so that transformers' own
Qwen3ForCausalLM / Qwen2ForCausalLM still load an exported directory as a text LM; the Uni-X
fields (spec §5, named and defaulted as in the reference) ride along in config.json.
"""

from dataclasses import dataclass

from transformers import Qwen2Config, Qwen3Config


@dataclass(kw_only=True)
class UniXFields:
    """The spec §5 fields shared by both layer styles (a dataclass so the config dataclass picks them up)."""

    num_vision_encode_layers: int = 0
    num_vision_decode_layers: int = 0
    vision_vocab_size: int = 8192
    real_text_vocab_size: int = 151665
    vision_start_id: int = 151652
    all_modal_visible: int = 0
    add_sep_for_vis: bool | int = False
    vis_sep_tokens: list[int] | int | str | None = None
    vis_sep_lens: list[int] | int | str | None = None
    skip_connection_loc: int = -1
    add_share_ffn: int = 0
    ffn_share_size: int | None = None
    ffn_vision_size: int | None = None

    def separator_ids(self) -> tuple[int, ...]:
        """Ids routed as vision besides VQ codes and BOI: `vis_sep_tokens` when `add_sep_for_vis`.

        Accepts a list of ids, one id or a comma-separated string of ids. The reference writes token
        *texts* there (e.g. "<|vision_pad|>"), which only its tokenizer can resolve, so those are refused.
        """
        if not self.add_sep_for_vis:
            return ()
        raw = self.vis_sep_tokens
        items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, (list, tuple)) else [raw]
        try:
            return tuple(int(item) for item in items)
        except (TypeError, ValueError):
            raise ValueError(f"vis_sep_tokens={raw!r}: add_sep_for_vis needs the separator token ids "
                             "(e.g. [151654] or \"151654\"), not token texts") from None

    def check_supported(self) -> None:
        """Refuse the optional reference variants this code does not implement, naming the field."""
        unsupported = {
            "skip_connection_loc": self.skip_connection_loc != -1,
            "add_share_ffn": bool(self.add_share_ffn),
            "all_modal_visible": bool(self.all_modal_visible),
            "use_sliding_window": bool(getattr(self, "use_sliding_window", False)),
        }
        for field, enabled in unsupported.items():
            if enabled:
                raise ValueError(f"Uni-X remote code does not support {field}={getattr(self, field)!r}")


class UniQwen3Config(UniXFields, Qwen3Config):
    """Uni-X with Qwen3-style layers (QK norm, no q/k/v bias): the reference checkpoints."""


class UniQwen2Config(UniXFields, Qwen2Config):
    """Uni-X with Qwen2-style layers (q/k/v bias, no QK norm): a Qwen2.5 import kept as is."""
