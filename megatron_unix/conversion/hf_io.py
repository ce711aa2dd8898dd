"""Hugging Face checkpoint directories: lazy reading, validation against config.json, and writing.

Tensors are read from safetensors one at a time on access (single file or sharded with
``model.safetensors.index.json``), so a converter never holds the whole HF checkpoint. What a
directory must contain is not listed here by hand: it is the ``state_dict`` of the HF model class
for its config.json, instantiated on the meta device (no memory), so names and shapes are exactly
transformers' (or the Uni-X remote code's).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import PretrainedConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from megatron_unix.conversion.hf_remote import REMOTE_CODE_DIR, REMOTE_CODE_FILES, causal_lm_class, variant_of
from megatron_unix.conversion.hf_remote.modeling_unix import TRANSFORMERS_SUPPORTED
from megatron_unix.files import WriteError, write_atomically

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
)
UNIX_MARKER = "num_vision_encode_layers"
"""A config.json with this field is a Uni-X checkpoint in the reference format (spec §5)."""

TEXT_CLASSES: dict[str, tuple[type, type]] = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
"""transformers' (config, text LM) per layer style = HF model_type."""


class ConversionError(ValueError):
    """A checkpoint or option the converter refuses; the message names the tensor, field or flag."""


def model_class(style: str, variant: str | None = None) -> type:
    """The HF causal-LM class of a layer style: transformers' text LM (``variant`` None) or the remote
    code's class of ``"unix"``, ``"hardmoe"`` or ``"mot"``."""
    return TEXT_CLASSES[style][1] if variant is None else causal_lm_class(style, variant)


def expected_tensors(config: PretrainedConfig, variant: str | None) -> dict[str, torch.Size]:
    """Name -> shape of every tensor an HF checkpoint of ``config`` holds (``lm_head`` absent when tied)."""
    with torch.device("meta"):
        model = model_class(config.model_type, variant)(config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def read_json(path: Path) -> dict:
    """A JSON object file; a truncated or otherwise damaged one is an error naming it."""
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: a JSON {type(value).__name__}, not an object")
    return value


ORIGIN = "megatron_checkpoint.json"
"""In an export: the Megatron checkpoint it was written from (``checkpoint``, ``iteration``,
``tokens_seen``), so that evaluations of the export and of the checkpoint are known to be of one model."""


def read_origin(directory: str | Path) -> dict[str, Any] | None:
    """An export's :data:`ORIGIN` record, or None (a reference checkpoint, an export from before it)."""
    path = Path(directory) / ORIGIN
    return read_json(path) if path.is_file() else None


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


class HFCheckpoint:
    """An HF checkpoint directory: its config (a transformers config object) and lazy tensors.

    ``kind`` is ``"unix"`` for a reference-format Uni-X checkpoint, else the text model's
    ``model_type`` (``"qwen2"`` covers Qwen2 and Qwen2.5); ``style`` is the layer style either way.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{self.path}: no config.json (not a Hugging Face checkpoint directory)")
        raw = read_json(config_file)
        self.raw: dict = raw
        """config.json as written (transformers' config object below may normalise or rename keys)."""
        self.style = raw.get("model_type")
        if self.style not in TEXT_CLASSES:
            raise ConversionError(
                f"{config_file}: model_type={self.style!r} is not supported (expected one of {sorted(TEXT_CLASSES)})"
            )
        self.kind = "unix" if UNIX_MARKER in raw else self.style
        self.variant: str | None = variant_of(raw) if self.kind == "unix" else None
        """The remote-code variant of a reference-format directory; None for a text model."""
        config_cls = model_class(self.style, self.variant).config_class
        try:
            self.config: PretrainedConfig = config_cls.from_dict(copy.deepcopy(raw))
        except Exception as error:  # transformers' validation errors are of types that differ between versions
            reason = " ".join(str(error).split())  # one line
            raise ConversionError(f"{config_file}: transformers refuses this config ({reason})") from None
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no weight_map (tensor name -> shard file)")
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise ConversionError(f"{index} names shard {missing[0]}, which is not in {self.path}")
            return weight_map
        single = self.path / SAFETENSORS_FILE
        if not single.is_file():
            raise ConversionError(
                f"{self.path}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} "
                "(only safetensors checkpoints are supported)"
            )
        return {name: SAFETENSORS_FILE for name in _open_safetensors(single).keys()}

    def _handle(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = _open_safetensors(self.path / file)
        return self._handles[file]

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except SafetensorError as error:
            raise ConversionError(
                f"{self.path / self.weight_map[name]}: tensor {name} cannot be read ({error})"
            ) from None

    def validate(self) -> None:
        """Every tensor config.json implies is present with its shape, and nothing else is there."""
        where = f"{self.path} (model_type {self.style}{', Uni-X' if self.kind == 'unix' else ''})"
        self.check_tensors(expected_tensors(self.config, self.variant), where)

    def check_tensors(self, expected: Mapping[str, torch.Size], where: str, unused: Iterable[str] = ()) -> None:
        """Each ``expected`` tensor present with its shape; nothing else but ``unused`` (and a tied head)."""
        for name, shape in expected.items():
            if name not in self.weight_map:
                raise ConversionError(f"{where}: tensor {name} is missing")
            if self.shape(name) != shape:
                raise ConversionError(
                    f"{where}: tensor {name} has shape {list(self.shape(name))}, config.json implies {list(shape)}"
                )
        tied_head = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        allowed = {*expected, *tied_head, *unused}
        unexpected = [n for n in self.weight_map if n not in allowed]
        if unexpected:
            raise ConversionError(
                f"{where}: tensor {unexpected[0]} is not part of the model config.json describes"
                + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            )


def _open_safetensors(path: Path):
    """A safetensors file opened lazily; a damaged one (truncated, bad header) is an error naming it."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error})") from None


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only dict whose values are computed on access (each access recomputes: nothing is cached)."""

    def __init__(self, thunks: dict[str, Callable[[], torch.Tensor]]) -> None:
        self.thunks = thunks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.thunks[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.thunks)

    def __len__(self) -> int:
        return len(self.thunks)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' weight-loading progress bars and per-tensor reports kept out of the log while a
    model loads (the programs say what they load, and check what it must hold, themselves)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    directory: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write ``tensors`` as ``dtype`` safetensors with HF's sharding (and index when sharded).

    Shards are planned from shapes alone and converted one shard at a time, so only one shard's
    worth of converted tensors exists at once.
    """
    plan = split_torch_state_dict_into_shards(
        {name: torch.empty(t.shape, dtype=dtype, device="meta") for name, t in tensors.items()},
        max_shard_size=max_shard_size,
    )
    progress = tqdm(total=len(tensors), desc="writing safetensors", unit="tensor")
    for file, names in plan.filename_to_tensors.items():
        shard = {}
        for name in names:
            shard[name] = tensors[name].detach().to(dtype).contiguous()
            progress.update()
        # (safetensors creates its files 0600; written through write_atomically they get the usual 0644)
        try:
            write_atomically(directory / file, partial(save_file, shard, metadata={"format": "pt"}))
        except SafetensorError as error:  # its I/O errors (a full disk) are not OSErrors
            raise WriteError(None, str(error), str(directory / file)) from None
    progress.close()
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(source: Path, directory: Path) -> list[str]:
    """Copy the tokenizer files of an HF tokenizer directory; returns the names copied."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy(source / name, directory / name)
    return copied


def copy_remote_code(directory: Path) -> None:
    """The modeling files that config.json's ``auto_map`` names (trust_remote_code)."""
    for name in REMOTE_CODE_FILES:
        shutil.copy(REMOTE_CODE_DIR / name, directory / name)


def _architecture_line(config: dict) -> str:
    """What the variant separates by modality, for the model card."""
    layers = config["num_hidden_layers"]
    variant = variant_of(config)
    if variant == "hardmoe":
        step = config["decoder_sparse_step"]
        return f"HardMoE (spec §9): {layers} layers, every {step}th with a vision MLP; one global attention"
    if variant == "mot":
        return (
            f"MoT (spec §9): {layers} layers, each with vision q/k/v projections, QK norms and an MLP of width "
            f"{config['ffn_vision_size']}; one global attention"
        )
    return (
        f"Uni-X: {layers} layers of which the first {config['num_vision_encode_layers']} and the last "
        f"{config['num_vision_decode_layers']} are separated by modality"
    )


def write_model_card(directory: Path, config: dict) -> None:
    """README.md: what the directory is and how each kind of user loads it (HF's model-card convention)."""
    low, high = TRANSFORMERS_SUPPORTED
    text_class = TEXT_CLASSES[config["model_type"]][1].__name__
    (directory / "README.md").write_text(f"""# {config["architectures"][0]} checkpoint

Exported by megatron-unix (`tools/convert_checkpoint.py export-hf`): {config["model_type"]} layers,
{_architecture_line(config)};
vocabulary {config["vocab_size"]} (text ids below {config["real_text_vocab_size"]}, then \
{config["vision_vocab_size"]} VQ codes), bf16 safetensors.

## Loading

- Both modalities: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. The remote code
  (`modeling_unix.py`) needs `transformers>={low},<{high}`; CI tests 4.53.3 (the reference's pin) and
  megatron-unix's pinned release. Cached `generate()` keeps per-modality keys and values.
- Text only: `{text_class}.from_pretrained(path)` ignores the vision tensors; on text input it gives the
  model's logits.
- The reference implementation reads config.json as written (`rope_theta`, separators as token text).
""")
