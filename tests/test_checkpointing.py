"""Checkpoint directory bookkeeping (pruning keeps the newest K and never the one just saved) and damage
caught at the door: checksums verified at load, missing pieces named, a failed save naming its directory."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import garble, largest_item

from megatron_unix.training.checkpointing import TRACKER, _commit, _prune, find_checkpoint


def _iterations(root) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())


def _fake_checkpoint(path) -> None:
    path.mkdir()
    (path / "metadata.json").write_text("{}")


def test_prune_keeps_the_newest_and_the_one_just_saved(tmp_path):
    for it in (1, 2, 3, 4, 5, 6):
        _fake_checkpoint(tmp_path / f"iter_{it:07d}")
    _prune(tmp_path, keep_last=3, iteration=6)
    assert _iterations(tmp_path) == [4, 5, 6]


def test_prune_after_a_restarted_count_never_deletes_the_new_checkpoint(tmp_path):
    for it in (48000, 49000, 50000):
        _fake_checkpoint(tmp_path / f"iter_{it:07d}")
    partial = tmp_path / "iter_0001000.partial"
    _fake_checkpoint(partial)
    _commit(tmp_path, partial, tmp_path / "iter_0001000", 1000)
    _prune(tmp_path, keep_last=2, iteration=1000)
    assert 1000 in _iterations(tmp_path)
    assert (tmp_path / TRACKER).read_text().strip() == "1000"
    assert find_checkpoint(tmp_path) == tmp_path / "iter_0001000"


def test_resaving_an_iteration_replaces_it_atomically(tmp_path):
    _fake_checkpoint(tmp_path / "iter_0000003")
    (tmp_path / "iter_0000003" / "old").write_text("old")
    partial = tmp_path / "iter_0000003.partial"
    _fake_checkpoint(partial)
    _commit(tmp_path, partial, tmp_path / "iter_0000003", 3)
    assert not (tmp_path / "iter_0000003" / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", TRACKER]


# ------------------------------------------------------------------------------- damage at the door


@pytest.fixture(scope="module")
def saved(megatron_single, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny model's checkpoint written by the production save, and the weights it holds."""
    from helpers import build_tiny
    from tiny import TINY_VOCAB

    from megatron_unix.model.config import ModelArguments
    from megatron_unix.training import checkpointing

    model, config = build_tiny()
    root = tmp_path_factory.mktemp("saved")
    checkpointing.save(root, 1, model, model_args=ModelArguments.of(config, TINY_VOCAB).to_dict())
    return root, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    """A fresh copy of the saved checkpoint's ``iter_*`` directory, to damage."""
    shutil.copytree(saved[0], tmp_path / "save")
    return tmp_path / "save" / "iter_0000001"


def truncate(checkpoint: Path) -> str:
    name = largest_item(checkpoint)[0]
    os.truncate(checkpoint / name, (checkpoint / name).stat().st_size - 1000)
    return name


def delete(name: str | None = None) -> Callable[[Path], str]:
    """Delete ``name``, or (None) the last shard."""

    def damage(checkpoint: Path) -> str:
        target = name or max(p.name for p in checkpoint.glob("*.distcp"))
        (checkpoint / target).unlink()
        return target

    return damage


def malform_manifest(checkpoint: Path) -> str:
    """Valid JSON, but an entry without its size: must be refused as a whole, not crash one rank."""
    import json

    path = checkpoint / "checksums.json"
    manifest = json.loads(path.read_text())
    del next(iter(manifest["files"].values()))["size"]
    path.write_text(json.dumps(manifest))
    return "checksums.json is malformed"


DAMAGE = {
    "garbled shard": garble,
    "truncated shard": truncate,
    "deleted shard": delete(),
    "deleted common.pt": delete("common.pt"),
    "deleted .metadata": delete(".metadata"),
    "malformed manifest": malform_manifest,
}


def _load(checkpoint: Path, verify: bool = True) -> torch.nn.Module:
    from helpers import build_tiny

    from megatron_unix.training import checkpointing

    model, _ = build_tiny(seed=1)
    checkpointing.load(checkpoint, model, load_rng=False, verify=verify)
    return model


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_file(copy, damage):
    from megatron_unix.training.checksums import CheckpointError

    name = DAMAGE[damage](copy)
    with pytest.raises(CheckpointError) as refused:
        _load(copy)
    assert str(copy) in str(refused.value) and name in str(refused.value)


def test_damaged_common_part_is_refused_before_start_up(copy):
    """``read_common`` runs before any process group (the stored architecture): it checks its own files."""
    from megatron_unix.training import checkpointing
    from megatron_unix.training.checksums import CheckpointError

    path = copy / "common.pt"
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match="common.pt is damaged"):
        checkpointing.read_common(copy)


def test_no_verify_loads_a_garbled_shard(saved, copy):
    """The flag works: the same damage that is refused above loads, and changes the weights."""
    garble(copy)
    loaded = dict(_load(copy, verify=False).named_parameters())
    changed = [name for name, value in saved[1].items() if not torch.equal(loaded[name], value)]
    assert len(changed) == 1


def test_checkpoint_without_manifest_loads_with_a_notice(saved, copy, capsys):
    from megatron_unix.training.checksums import MANIFEST

    (copy / MANIFEST).unlink()
    loaded = dict(_load(copy).named_parameters())
    assert all(torch.equal(loaded[name], value) for name, value in saved[1].items())
    assert capsys.readouterr().out.count("cannot be verified") == 1


def test_disk_full_during_save_names_the_directory_and_keeps_the_last_checkpoint(saved, copy, monkeypatch):
    from helpers import build_tiny
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_unix.training import checkpointing
    from megatron_unix.training.checksums import CheckpointError

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    root = copy.parent
    monkeypatch.setattr(filesystem_async, "open", full, raising=False)  # the shard writer's (forked) processes
    with pytest.raises(CheckpointError) as failed:
        checkpointing.save(root, 2, build_tiny()[0], model_args={})
    assert str(root / "iter_0000002") in str(failed.value) and "No space left on device" in str(failed.value)
    assert (root / TRACKER).read_text().strip() == "1" and find_checkpoint(root) == copy
    assert not (root / "iter_0000002").exists()
    monkeypatch.undo()
    assert all(torch.equal(p, saved[1][n]) for n, p in _load(copy).named_parameters())


def test_export_hf_refuses_a_garbled_checkpoint(copy, tmp_path, capsys):
    from megatron_unix.cli.convert_checkpoint import main

    name = garble(copy)
    assert main(["export-hf", "--load", str(copy.parent), "--save", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert str(copy / name) in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
