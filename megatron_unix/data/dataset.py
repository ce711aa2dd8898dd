"""Packed training rows over preprocessed samples, as a Megatron dataset (spec §3-§4).

:class:`UniXPackedDataset` is a ``MegatronDataset`` over one :class:`MultimodalDocuments` prefix, so
``BlendedMegatronDatasetBuilder`` gives weighted blends and train/valid/test splits exactly as in
Megatron-LM. Each epoch shuffles the split's samples and fills rows of ``seq_length + 1`` tokens
greedily (tokens = row[:-1], labels = row[1:]):

- a sample with vision tokens is atomic: if it does not fit in the rest of the row, the row is
  padded and the sample starts the next one; one longer than a row is dropped;
- a text sample fills the rest of the row and continues in the next, which starts by repeating the
  previous row's last token (that position is only a label there), so every token is an input once
  and a target once; one longer than a row is cut to a row (``long_text="truncate"``) or keeps
  spilling over rows (``"split"``).

Epochs are packed independently and concatenated until ``num_samples`` rows exist. The packing is
two flat arrays (``row_offsets`` into ``pieces`` of (sample, start, length)), cached as ``.npy``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split, get_blend_from_list
from megatron.core.utils import log_single_rank

from megatron_unix.data.indexed import MultimodalDocuments
from megatron_unix.data.tokenizer import MultimodalTokenizer

logger = logging.getLogger(__name__)

LONG_TEXT = ("truncate", "split")


@dataclass
class UniXDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config plus what packing needs (``tokenizer`` is a MultimodalTokenizer)."""

    long_text: Literal["truncate", "split"] = "truncate"
    """A text sample longer than a row: cut to one row, or split over as many rows as it needs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer is None:
            raise ValueError("UniXDatasetConfig needs a tokenizer (its EOS id pads the rows)")
        if self.long_text not in LONG_TEXT:
            raise ValueError(f"long_text must be one of {LONG_TEXT}, not {self.long_text!r}")


@dataclass
class PackingStats:
    """What packing did to one split of one prefix. Drop and truncation counts are per epoch; the
    padding fraction is of all row tokens (seq_length + 1 per row)."""

    rows: int
    epochs: int
    samples: int
    padding_fraction: float
    dropped_images: int
    truncated_texts: int


def pack_epoch(
    samples: np.ndarray, lengths: np.ndarray, images: np.ndarray, capacity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of samples, in the given order, into rows of ``capacity`` tokens.

    Every image sample must fit in a row (drop the others first). Returns ``row_ends`` (row r holds
    pieces ``row_ends[r-1]:row_ends[r]``) and ``pieces`` [P, 3] = (sample, start, length), int32.
    A plain loop: ~0.4 µs per sample, and a row boundary depends on everything before it.
    """
    pieces, row_ends = array("i"), array("q")
    add, close = pieces.extend, row_ends.append
    count = pos = 0
    for sample, n, image in zip(samples.tolist(), lengths.tolist(), images.tolist()):
        start = 0
        if image and pos + n > capacity:
            close(count)
            pos = 0
        while pos + n - start > capacity:  # only text gets here: fill the row, repeat its last token
            take = capacity - pos
            add((sample, start, take))
            count += 1
            close(count)
            start += take - 1
            pos = 0
        add((sample, start, n - start))
        count += 1
        pos += n - start
        if pos == capacity:
            close(count)
            pos = 0
    if pos:
        close(count)
    return np.frombuffer(row_ends, np.int64), np.frombuffer(pieces, np.int32).reshape(-1, 3)


class UniXPackedDataset(MegatronDataset):
    """Rows of packed samples from one split of one prefix; row i is always the same row."""

    def __init__(
        self,
        dataset: MultimodalDocuments,
        dataset_path: str | None,
        indices: np.ndarray,
        num_samples: int | None,
        index_split: Split,
        config: UniXDatasetConfig,
    ) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.row_offsets, self.pieces, self.stats = self._build_or_load()

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MultimodalDocuments) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: UniXDatasetConfig) -> MultimodalDocuments:
        return MultimodalDocuments(dataset_path, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return MegatronDataset._key_config_attributes() + ["long_text"]

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """tokens, labels, loss_mask, document_ids of row ``idx``, each [seq_length].

        Document ids number the row's pieces 0, 1, ...; padding (EOS, no loss) is one more document.
        A target gets loss when it is trained and in the same piece as its input.
        """
        if not 0 <= idx < len(self):
            raise IndexError(
                f"row {idx} is out of range: {self.dataset_path} {self.index_split.name} has {len(self)} rows"
            )
        capacity = self.config.sequence_length + 1
        row = np.full(capacity, self.config.tokenizer.eos_id, dtype=np.int64)
        trained = np.zeros(capacity, dtype=bool)
        documents = np.empty(capacity, dtype=np.int64)
        pieces = self.pieces[self.row_offsets[idx] : self.row_offsets[idx + 1]]
        pos = 0
        for document, (sample, start, length) in enumerate(pieces.tolist()):
            row[pos : pos + length], trained[pos : pos + length] = self.dataset.sample(sample, start, length)
            documents[pos : pos + length] = document
            pos += length
        documents[pos:] = len(pieces)
        loss_mask = trained[1:] & (documents[1:] == documents[:-1])
        row_t = torch.from_numpy(row)
        return {
            "tokens": row_t[:-1],
            "labels": row_t[1:],
            "loss_mask": torch.from_numpy(loss_mask).float(),
            "document_ids": torch.from_numpy(documents[:-1]),
        }

    def _cache_paths(self) -> dict[str, str]:
        root = self.config.path_to_cache or os.path.join(
            os.path.dirname(os.path.abspath(self.dataset_path)), "cache", f"{type(self).__name__}_indices"
        )
        # Megatron's key plus the data's size: re-preprocessing into the same prefix gets a new index.
        key = f"{self.unique_description_hash}-{len(self.dataset)}-{int(self.dataset.lengths.sum(dtype=np.int64))}"
        key = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
        base = os.path.join(root, f"{key}-{type(self).__name__}-{self.index_split.name}")
        return {name: f"{base}-{name}" for name in ("row_offsets.npy", "pieces.npy", "stats.json", "description.json")}

    def _build_or_load(self) -> tuple[np.ndarray, np.ndarray, PackingStats]:
        """Load the cached packing, or build and cache it.

        The builder constructs the dataset on rank 0 first and on the other ranks after a barrier,
        so they load; a rank that still finds no cache (a node-local cache directory) builds the
        same packing itself, since it is deterministic.
        """
        paths = self._cache_paths()
        if all(os.path.isfile(p) for p in paths.values()):
            row_offsets = np.load(paths["row_offsets.npy"], mmap_mode="r")
            pieces = np.load(paths["pieces.npy"], mmap_mode="r")
            with open(paths["stats.json"]) as f:
                stats = PackingStats(**json.load(f))
            action = "Loaded"
        else:
            t0 = time.perf_counter()
            row_offsets, pieces, stats = self._pack()
            self._save(paths, row_offsets, pieces, stats)
            action = f"Built in {time.perf_counter() - t0:.2f} s and cached"
        log_single_rank(
            logger,
            logging.INFO,
            f"{action} {type(self).__name__} {self.index_split.name} of {self.dataset_path}: {stats.rows} rows "
            f"of {self.config.sequence_length} tokens from {stats.samples} samples x {stats.epochs} epoch(s), "
            f"padding {100 * stats.padding_fraction:.2f}%, per epoch {stats.dropped_images} image samples "
            f"dropped and {stats.truncated_texts} text samples truncated (longer than a row)",
        )
        return row_offsets, pieces, stats

    def _pack(self) -> tuple[np.ndarray, np.ndarray, PackingStats]:
        capacity = self.config.sequence_length + 1
        lengths = np.asarray(self.dataset.lengths[self.indices], dtype=np.int64)
        images = np.asarray(self.dataset.vision_tokens[self.indices]) > 0
        too_long = lengths > capacity
        dropped = images & too_long
        truncated = ~images & too_long if self.config.long_text == "truncate" else np.zeros_like(too_long)
        lengths = np.where(truncated, capacity, lengths)
        keep = ~dropped & (lengths > 0)
        target = self.num_samples or 0
        ends, chunks, rows, num_pieces, epoch = [np.zeros(1, np.int64)], [], 0, 0, 0
        while epoch == 0 or rows < target:
            order = np.random.default_rng((self.config.random_seed, epoch)).permutation(len(self.indices))
            order = order[keep[order]]
            row_ends, pieces = pack_epoch(self.indices[order], lengths[order], images[order], capacity)
            if not len(row_ends) and rows < target:
                raise ValueError(
                    f"{self.dataset_path}: the {self.index_split.name} split has no sample that fits "
                    f"in a row of {self.config.sequence_length} tokens, but {target} rows were asked for"
                )
            ends.append(row_ends + num_pieces)
            chunks.append(pieces)
            rows, num_pieces, epoch = rows + len(row_ends), num_pieces + len(pieces), epoch + 1
        row_offsets = np.concatenate(ends)
        pieces = np.concatenate(chunks)
        padding = rows * capacity - int(pieces[:, 2].sum(dtype=np.int64))
        stats = PackingStats(
            rows=rows,
            epochs=epoch,
            samples=len(self.indices),
            padding_fraction=padding / max(1, rows * capacity),
            dropped_images=int(dropped.sum()),
            truncated_texts=int(truncated.sum()),
        )
        return row_offsets, pieces, stats

    def _save(self, paths: dict[str, str], row_offsets: np.ndarray, pieces: np.ndarray, stats: PackingStats) -> None:
        """Each file goes to a unique temporary name first, so readers never see a partial one (and
        ranks, or builder threads given the same prefix twice, never write into each other's)."""
        contents = {
            "row_offsets.npy": row_offsets,
            "pieces.npy": pieces,
            "stats.json": json.dumps(asdict(stats), indent=4),
            "description.json": self.unique_description,
        }
        folder = os.path.dirname(paths["pieces.npy"])
        try:
            os.makedirs(folder, exist_ok=True)
            for name, content in contents.items():
                partial = f"{paths[name]}.partial-{os.getpid()}-{threading.get_ident()}"
                try:
                    with open(partial, "wb") as f:
                        if isinstance(content, str):
                            f.write(content.encode())
                        else:
                            np.save(f, content)
                    os.replace(partial, paths[name])
                finally:
                    if os.path.exists(partial):
                        os.unlink(partial)
        except OSError as error:  # a full disk, a read-only folder: named, with the flag that moves the cache
            raise OSError(
                f"{folder}: cannot write the packing cache ({error.strerror or error}); "
                "--data-cache-path puts it elsewhere"
            ) from error


def build_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer: MultimodalTokenizer,
    train_valid_test_num_samples: tuple[int | None, int | None, int | None],
    cache_dir: str | None = None,
    long_text: Literal["truncate", "split"] = "truncate",
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> list[UniXPackedDataset | BlendedDataset | None]:
    """Train, valid and test datasets (or None) for ``--data-path`` (``[w1] p1 [w2] p2 ...``) and ``--split``."""
    if not data_path:
        raise ValueError("--data-path names no dataset")
    config = UniXDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=get_blend_from_list(data_path),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        long_text=long_text,
    )
    try:
        return BlendedMegatronDatasetBuilder(
            UniXPackedDataset, list(train_valid_test_num_samples), is_built_on_rank, config
        ).build()
    except Exception as error:  # megatron-core wraps rank 0's OSError writing the cache in a bare Exception
        if isinstance(error.__cause__, OSError):
            raise error.__cause__ from None
        raise
