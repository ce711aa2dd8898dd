"""The tensors of a Lightning-era ``.ckpt`` (taming's and Chameleon's ``vqgan.ckpt``) without running code
from the file.

Such files pickle more than tensors: the trainer's callback classes (``callbacks`` keyed by the
``ModelCheckpoint`` class in Lightning 1.x), ``hyper_parameters`` as Lightning's ``AttributeDict`` or an
omegaconf ``DictConfig``, an ``argparse.Namespace`` of the launch flags, paths, numpy scalars in the
callbacks' state. ``torch.load(weights_only=True)`` refuses them all. Here the same restricted unpickler
reads them through an allow-list: data types stand for themselves, and the classes of Lightning and
omegaconf are replaced by inert stand-ins (never imported, never run): only ``state_dict`` is kept. A
global outside the list is refused by name.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely; the message names the file (and the global)."""


class StandIn:
    """An object of a class this file is not allowed to import: it takes any constructor arguments and
    state, and does nothing with them."""

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def _stand_in(name: str) -> tuple[type, str]:
    return type(name.rsplit(".", 1)[1], (StandIn,), {"__module__": __name__}), name


_LIGHTNING = [
    f"{package}.{name}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for name in (
        "callbacks.model_checkpoint.ModelCheckpoint",
        "callbacks.early_stopping.EarlyStopping",
        "callbacks.lr_monitor.LearningRateMonitor",
    )
]
_ATTRIBUTE_DICTS = [
    (dict, f"{package}.utilities.parsing.AttributeDict") for package in ("pytorch_lightning", "lightning.pytorch")
]
"""Lightning's ``dict`` subclass of hyper-parameters is read as a plain ``dict`` (torch fills only exact
dicts with items)."""
_OMEGACONF = [
    f"omegaconf.{name}"
    for name in (
        "dictconfig.DictConfig",
        "listconfig.ListConfig",
        "base.ContainerMetadata",
        "base.Metadata",
        "nodes.AnyNode",
        "nodes.StringNode",
        "nodes.IntegerNode",
        "nodes.FloatNode",
        "nodes.BooleanNode",
    )
]
_MULTIARRAY = numpy._core.multiarray if hasattr(numpy, "_core") else numpy.core.multiarray
_NUMPY = [
    (getattr(_MULTIARRAY, name), f"{package}.multiarray.{name}")
    for package in ("numpy.core", "numpy._core")
    for name in ("scalar", "_reconstruct")
]
"""Numpy 1 pickles ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``: both names, one object."""
ALLOWED_GLOBALS: list[Any] = [
    *(_stand_in(name) for name in _LIGHTNING + _OMEGACONF),
    *_ATTRIBUTE_DICTS,
    *_NUMPY,
    numpy.dtype,
    numpy.ndarray,
    *(type(numpy.dtype(kind)) for kind in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")),
    argparse.Namespace,
    pathlib.PosixPath,
    (pathlib.PureWindowsPath, "pathlib.WindowsPath"),
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    defaultdict,
    typing.Any,
    *(dict, list, tuple, set, int, float, str, bool, bytes),
]
"""What Lightning-era checkpoints are known to pickle beside their tensors (torch's own tensor and
OrderedDict globals are allowed by torch). Numpy and the standard types are data; Lightning's and
omegaconf's classes become :class:`StandIn`."""
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")
_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` tensors of the checkpoint at ``path`` (on the CPU)."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            stored = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except pickle.UnpicklingError as e:
        if found := _UNSUPPORTED.search(str(e)):
            raise CheckpointError(
                f"{path}: holds {found.group(1)}, which is not among the objects Lightning checkpoints are known to "
                "hold, so the file is not unpickled (that would run its code); save its 'state_dict' tensors "
                "with the tool that wrote it (torch.save of the dict alone, or safetensors), or add the global to "
                "ALLOWED_GLOBALS in megatron_unix/image/lightning_checkpoint.py once you know what it is"
            ) from None
        detail = found.group(1) if (found := _DETAIL.search(str(e))) else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or not one ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or not one ({reason})") from None
    state = stored.get("state_dict") if isinstance(stored, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no 'state_dict' of tensors in it (is it a taming/Chameleon vqgan.ckpt?)")
    return dict(state)
