"""Hugging Face remote code for Uni-X checkpoints: the files a converter copies next to config.json."""

from pathlib import Path

REMOTE_CODE_DIR = Path(__file__).parent
REMOTE_CODE_FILES = ("configuration_unix.py", "modeling_unix.py")

_CLASS_PREFIX = {"qwen3": "UniQwen3", "qwen2": "UniQwen2"}


def auto_map(style: str) -> dict:
    """config.json `auto_map` for layer style "qwen3" or "qwen2".

    With it (and trust_remote_code=True) AutoConfig / AutoModelForCausalLM load the Uni-X classes even
    though `model_type` stays the base model's, which keeps the directory loadable as a plain text LM.
    """
    if style not in _CLASS_PREFIX:
        raise ValueError(f"unknown layer style {style!r}; expected one of {sorted(_CLASS_PREFIX)}")
    prefix = _CLASS_PREFIX[style]
    return {
        "AutoConfig": f"configuration_unix.{prefix}Config",
        "AutoModelForCausalLM": f"modeling_unix.{prefix}ForCausalLM",
    }
