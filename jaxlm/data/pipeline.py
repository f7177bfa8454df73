"""Batches for training and evaluation from a prepared directory.

The global sample index g = step * global_batch + row is the only state: epoch g // n_windows,
window order[g], where ``order`` is grain's seeded shuffle that changes every epoch. So the batch of
step s is the same for any process count or mesh, a run resumed at step s sees exactly what an
uninterrupted run would have, and a global batch may straddle an epoch boundary. Each process
builds only its own rows.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np

from jaxlm.config import DataConfig, ModelConfig
from jaxlm.data.prepare import (
    DataError,
    describe_inputs,
    prepare,
    read_index,
    resolve_inputs,
    tokenizer_spec,
)
from jaxlm.data.segmenter import TokenStream, Windows


def ensure_prepared(data_cfg: DataConfig, model_cfg: ModelConfig, check_split: bool = True) -> dict:
    """Prepare ``data_cfg.dir`` from ``data_cfg.inputs`` if it has no index, then check it is what the
    config asks for (inputs, split) and fits the model.

    ``check_split=False`` is for evaluating on another prepared directory, whose inputs and split
    are its own. The checks are cheap (file sizes, no checksums) so every process can afford them.
    """
    directory = Path(data_cfg.dir)
    if not (directory / "index.json").is_file():
        prepare(
            list(data_cfg.inputs),
            data_cfg.tokenizer,
            str(directory),
            data_cfg.val_fraction,
            seed=data_cfg.split_seed,
            max_undecodable=data_cfg.max_undecodable,
        )
    index = read_index(directory)
    if index is None:
        raise DataError(f"{directory}/index.json disappeared while opening; is another run re-preparing it?")
    fix = f"delete {directory} to prepare it again, or point data.dir elsewhere"
    wanted = tokenizer_spec(data_cfg.tokenizer)
    if index["tokenizer"] != wanted:
        raise DataError(
            f"{directory} was prepared with tokenizer {index['tokenizer']!r} but data.tokenizer is "
            f"{wanted!r}; {fix}"
        )
    if check_split:
        check_split_settings(data_cfg, index)
    if index["vocab_size"] > model_cfg.vocab_size:
        raise DataError(
            f"{directory} holds token ids up to {index['vocab_size'] - 1} (tokenizer vocab_size "
            f"{index['vocab_size']}) but model.vocab_size is {model_cfg.vocab_size}; set "
            f"model.vocab_size >= {index['vocab_size']}"
        )
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in index["splits"].values():
        for shard in split["shards"]:
            path = directory / shard["name"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in index.json is missing; {fix}")
            size, expected = path.stat().st_size, shard["tokens"] * itemsize
            if size != expected:
                raise DataError(
                    f"shard {path} has {size} bytes but index.json records {shard['tokens']} tokens "
                    f"({expected} bytes); {fix}"
                )
    n_train = index["splits"]["train"]["tokens"]
    if n_train < model_cfg.seq_len + 1:
        raise DataError(
            f"the train split of {directory} has {n_train} tokens, fewer than one window of "
            f"seq_len+1={model_cfg.seq_len + 1}; use a larger corpus or a smaller model.seq_len"
        )
    return index


def check_split_settings(data_cfg: DataConfig, index: dict) -> None:
    """Refuse prepared data whose inputs or train/val split differ from the config's: the run's
    config.json would otherwise record a split it did not get."""
    directory = data_cfg.dir
    fix = (
        f"point data.dir at another directory for these settings, or delete {directory} to prepare it "
        "again (or set the config to the recorded value)"
    )
    for key, recorded, wanted in (
        ("data.val_fraction", index["val_fraction"], data_cfg.val_fraction),
        ("data.split_seed", index["seed"], data_cfg.split_seed),
    ):
        if recorded != wanted:
            raise DataError(
                f"{directory} was prepared with {key}={recorded} but the config has {wanted}; {fix}"
            )
    try:
        wanted_inputs = describe_inputs(resolve_inputs(data_cfg.inputs))
    except DataError:
        return  # the raw inputs are not on this machine: the prepared shards are all a run needs

    # Name and size, not the full path: the same corpus under another venv or mount is the same data.
    def files(described: list[dict]) -> list[tuple[str, int]]:
        return [(Path(d["path"]).name, d["bytes"]) for d in described]

    if files(index["inputs"]) != files(wanted_inputs):
        recorded = [d["path"] for d in index["inputs"]]
        raise DataError(
            f"{directory} was prepared from {len(recorded)} other input file(s) ({_brief(recorded)}) than "
            f"data.inputs={list(data_cfg.inputs)} gives ({_brief([d['path'] for d in wanted_inputs])}); {fix}"
        )


def _brief(paths: list[str], n: int = 2) -> str:
    return ", ".join(paths[:n]) + (f", ... ({len(paths)} files)" if len(paths) > n else "")


def unigram_entropy(data_cfg: DataConfig, index: dict, max_tokens: int = 1 << 26) -> float:
    """Entropy in nats of the train split's token frequencies (over its first ``max_tokens``): the
    loss of the best model that ignores context, the bar a language model must clear."""
    stream = TokenStream.from_index(data_cfg.dir, index, "train")
    counts = np.zeros(index["vocab_size"], np.int64)
    n = min(len(stream), max_tokens)
    for start in range(0, n, 1 << 22):
        counts += np.bincount(stream.read(start, min(start + (1 << 22), n)), minlength=len(counts))
    p = counts[counts > 0] / max(n, 1)
    return float(-(p * np.log(p)).sum())


def _seed32(seed: int) -> int:
    # grain reseeds epoch e with seed + e; hashing the user's seed keeps seed 1 from replaying
    # seed 0's epoch 1.
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


def window_order(n_windows: int, seed: int, shuffle: bool) -> grain.MapDataset:
    """order[g] is the window of global sample g; each epoch is a permutation, reshuffled per epoch."""
    order = grain.MapDataset.range(n_windows)
    if shuffle:
        order = order.shuffle(seed=_seed32(seed))
    return order.repeat()


class _BatchAt:
    """Step -> this process's rows of that step's global batch (a picklable class for mp workers)."""

    def __init__(
        self, windows: Windows, order: grain.MapDataset, global_batch: int, first_row: int, rows: int
    ):
        self.windows, self.order = windows, order
        self.global_batch, self.first_row, self.rows = global_batch, first_row, rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        g = step * self.global_batch + self.first_row
        return self.windows.batch([self.order[k] for k in range(g, g + self.rows)])


def _local_rows(global_batch: int, process_index: int, process_count: int) -> tuple[int, int]:
    if global_batch <= 0:
        raise DataError(f"global batch {global_batch} must be positive")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch % process_count:
        raise DataError(
            f"global batch {global_batch} is not divisible by the {process_count} processes; "
            f"set train.batch_size to a multiple of {process_count}"
        )
    rows = global_batch // process_count
    return process_index * rows, rows


class Loader:
    """Infinite iterator of this process's [global_batch / process_count, seq_len] training batches.

    Batches are built ``data_cfg.prefetch`` ahead by a grain prefetch thread, or by
    ``data_cfg.workers`` grain worker processes; call ``close()`` to stop them.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        model_cfg: ModelConfig,
        index: dict,
        global_batch: int,
        start_step: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        first_row, rows = _local_rows(global_batch, process_index, process_count)
        stream = TokenStream.from_index(data_cfg.dir, index, "train")
        self.windows = Windows(stream, model_cfg.seq_len, data_cfg.drop_last, data_cfg.document_masking)
        if len(self.windows) == 0:
            raise DataError(
                f"the train split has {len(stream)} tokens, fewer than one window of seq_len+1="
                f"{model_cfg.seq_len + 1}"
            )
        order = window_order(len(self.windows), data_cfg.shuffle_seed, data_cfg.shuffle)
        batch_at = _BatchAt(self.windows, order, global_batch, first_row, rows)
        steps = grain.MapDataset.range(start_step, sys.maxsize).map(batch_at)
        if data_cfg.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; jaxlm uses argparse
                flags.FLAGS.mark_as_parsed()
            dataset = steps.to_iter_dataset(
                grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            ).mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=data_cfg.workers,
                    per_worker_buffer_size=max(1, -(-data_cfg.prefetch // data_cfg.workers)),
                )
            )
        else:
            prefetch = data_cfg.prefetch
            dataset = steps.to_iter_dataset(
                grain.ReadOptions(num_threads=min(prefetch, 2), prefetch_buffer_size=prefetch)
            )
        self._iterator = iter(dataset)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def eval_batches(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    index: dict,
    global_batch: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "val",
) -> Iterator[dict[str, np.ndarray]]:
    """One split (val by default) in order, every target exactly once; the last batch is padded with
    loss-mask-0 rows.

    ``max_batches`` caps the number of global batches (0: the whole split).
    """
    first_row, rows = _local_rows(global_batch, process_index, process_count)
    if split not in index["splits"]:
        raise DataError(f"split {split!r} is not in {data_cfg.dir}; choose one of {sorted(index['splits'])}")
    if index["splits"][split]["tokens"] < 2:
        fix = (
            "set data.val_fraction > 0 (with at least two documents in the inputs) and prepare again"
            if split == "val"
            else "prepare it again"
        )
        raise DataError(
            f"the {split} split of {data_cfg.dir} is empty; {fix} (delete {data_cfg.dir} or point "
            "data.dir elsewhere)"
        )
    stream = TokenStream.from_index(data_cfg.dir, index, split)
    windows = Windows(stream, model_cfg.seq_len, drop_last=False, document_masking=data_cfg.document_masking)
    n_batches = -(-len(windows) // global_batch)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    return _eval_iter(windows, n_batches, global_batch, first_row, rows)


def _eval_iter(
    windows: Windows, n_batches: int, global_batch: int, first_row: int, rows: int
) -> Iterator[dict]:
    for b in range(n_batches):
        g = b * global_batch + first_row
        ids = list(range(g, min(g + rows, len(windows))))
        out = windows.empty_batch(rows)
        for row, i in enumerate(ids):
            windows.fill(out, row, i)
        yield out
