"""Checkpoint directory bookkeeping: pruning keeps the newest K and never the one just saved."""

from __future__ import annotations

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
