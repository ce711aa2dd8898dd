"""Lightning-era checkpoints (taming's and Chameleon's ``vqgan.ckpt``) made here with what such files
pickle beside ``state_dict`` — the ``ModelCheckpoint`` class as a callbacks key, Lightning's
``AttributeDict`` and an omegaconf-like ``DictConfig`` of hyper-parameters, an ``argparse.Namespace``,
paths, numpy scalars and arrays, optimizer state — written from stand-in modules under the real module
names (so the pickle stream names ``pytorch_lightning...``), then read without those modules: the tensors
come back equal; a global outside the allow-list, a truncated file and garbage are refused by name."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import types
import typing
from collections import OrderedDict

import numpy
import pytest
import torch
from test_vqgan import TINY, pixels, tiny_vqgan, write_chameleon

from megatron_unix.image.lightning_checkpoint import CheckpointError, load_state_dict
from megatron_unix.image.vqgan import VQGAN, VQGANError

CALLS: list[str] = []


def install(monkeypatch, module_name: str, **objects) -> types.ModuleType:
    """A module under ``module_name`` (and its parents) holding ``objects``, so pickle names them there."""
    parts = module_name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if parent not in sys.modules:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    module = types.ModuleType(module_name)
    for name, value in objects.items():
        value.__module__, value.__qualname__ = module_name, name
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, module_name, module)
    return module


class ModelCheckpoint:
    pass


class AttributeDict(dict):
    pass


@dataclasses.dataclass
class ContainerMetadata:
    ref_type: typing.Any = typing.Any
    object_type: typing.Any = dict
    key_type: typing.Any = typing.Any
    element_type: typing.Any = typing.Any


@dataclasses.dataclass
class AnyNode:
    value: typing.Any = None


class DictConfig:
    def __init__(self, content: dict) -> None:
        self._metadata, self._content, self._parent = ContainerMetadata(), content, None

    def __getstate__(self) -> dict:
        return dict(self.__dict__)


def record(tag: str) -> str:
    CALLS.append(tag)
    return tag


class Payload:
    def __reduce__(self):
        return record, ("ran",)


def lightning_checkpoint(monkeypatch, state: dict, legacy: bool, path: pathlib.Path) -> None:
    install(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint)
    install(monkeypatch, "pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict)
    install(monkeypatch, "omegaconf.base", ContainerMetadata=ContainerMetadata)
    install(monkeypatch, "omegaconf.nodes", AnyNode=AnyNode)
    install(monkeypatch, "omegaconf.dictconfig", DictConfig=DictConfig)
    args = argparse.Namespace(base=["configs/vqgan.yaml"], seed=23, logdir=pathlib.PosixPath("logs/run"))
    stored = {
        "epoch": 12,
        "global_step": 40000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": OrderedDict(state),
        "callbacks": {
            ModelCheckpoint: {
                "monitor": "val/rec_loss",
                "best_model_score": torch.tensor(0.1),
                "best_model_path": "logs/run/checkpoints/last.ckpt",
                "dirpath": pathlib.PosixPath("logs/run/checkpoints"),
                "current_score": numpy.float64(0.12),
            }
        },
        "optimizer_states": [{"state": {0: {"step": 4, "exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 4.5e-6}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(embed_dim=8, n_embed=64, args=args, steps=numpy.int64(7)),
        "config": DictConfig({"lr": AnyNode(4.5e-6), "shape": AnyNode(numpy.arange(3))}),
    }
    torch.save(stored, path, _use_new_zipfile_serialization=not legacy)
    for name in [name for name in sys.modules if name.split(".")[0] in ("pytorch_lightning", "omegaconf")]:
        monkeypatch.delitem(sys.modules, name)  # read back without them: nothing from them can run


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_lightning_checkpoint_gives_its_tensors(tmp_path, monkeypatch, legacy):
    model = tiny_vqgan(seed=5)
    config, ckpt = write_chameleon(tmp_path, {})
    loss = {"loss.logvar": torch.zeros(())}
    lightning_checkpoint(monkeypatch, {**model.state_dict(), **loss}, legacy, ckpt)
    assert "pytorch_lightning" not in sys.modules
    state = load_state_dict(ckpt)
    assert state.keys() == {*model.state_dict(), "loss.logvar"}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    loaded = VQGAN.from_chameleon(config, ckpt)
    assert loaded.config == TINY and torch.equal(loaded.encode(pixels(2)), model.encode(pixels(2)))


def test_a_global_outside_the_list_is_refused_by_name_and_never_run(tmp_path, monkeypatch):
    install(monkeypatch, "checkpoint_payload", record=record, Payload=Payload)
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"x": Payload()}}, path)
    with pytest.raises(CheckpointError) as error:
        load_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"{path}: holds checkpoint_payload.record, which is not among")
    assert "ALLOWED_GLOBALS in megatron_unix/image/lightning_checkpoint.py" in message
    assert "weights_only" not in message and CALLS == []


def test_truncated_or_garbage_files_are_named(tmp_path):
    config, ckpt = write_chameleon(tmp_path, tiny_vqgan().state_dict())
    whole = ckpt.read_bytes()
    for name, data in (("cut.ckpt", whole[: len(whole) // 2]), ("junk.ckpt", b"\x80\x02garbage" * 10)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VQGANError) as error:
            VQGAN.from_chameleon(config, tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name}: not a readable PyTorch checkpoint, truncated or not one (")
        assert "weights_only" not in message and "\n" not in message
    torch.save({"epoch": 1}, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match=r"bare\.ckpt: no 'state_dict' of tensors"):
        load_state_dict(tmp_path / "bare.ckpt")
