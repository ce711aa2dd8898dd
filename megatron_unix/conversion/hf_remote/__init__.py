"""Hugging Face remote code for Uni-X and the Table-4 baselines: the files a converter copies next to
config.json, and the names config.json uses for their classes."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .modeling_unix import CAUSAL_LM_CLASSES

REMOTE_CODE_DIR = Path(__file__).parent
REMOTE_CODE_FILES = ("configuration_unix.py", "modeling_unix.py")


def causal_lm_class(style: str, variant: str) -> type:
    """The remote-code LM of layer style "qwen3"/"qwen2" and variant "unix"/"hardmoe"/"mot"."""
    cls = CAUSAL_LM_CLASSES.get((style, variant))
    if cls is None:
        raise ValueError(
            f"no remote-code class for layer style {style!r} and variant {variant!r}; "
            f"expected one of {sorted(CAUSAL_LM_CLASSES)}"
        )
    return cls


def auto_map(style: str, variant: str = "unix") -> dict:
    """config.json `auto_map` of a model of this layer style and variant.

    With it (and trust_remote_code=True) AutoConfig / AutoModelForCausalLM load the remote-code classes
    even though `model_type` stays the base model's, which keeps the directory loadable as a plain text LM.
    """
    cls = causal_lm_class(style, variant)
    return {
        "AutoConfig": f"configuration_unix.{cls.config_class.__name__}",
        "AutoModelForCausalLM": f"modeling_unix.{cls.__name__}",
    }


def variant_of(config: Any) -> str:
    """``"hardmoe"``, ``"mot"`` or ``"unix"``: by the class config.json names under ``architectures``
    (the reference's class names for its baselines, spec §9); any other is Uni-X. ``config`` is a
    config object or a config.json dict."""
    names = config.get("architectures") if isinstance(config, Mapping) else getattr(config, "architectures", None)
    named = set(names or [])
    return next((variant for (_, variant), cls in CAUSAL_LM_CLASSES.items() if cls.__name__ in named), "unix")
