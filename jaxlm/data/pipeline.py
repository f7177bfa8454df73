"""Batches for training and evaluation from a prepared directory.

The global sample index g = step * global_batch + row is the only state: epoch g // n_windows,
window order[g], where ``order`` is grain's seeded shuffle that changes every epoch. So the batch of
step s is the same for any process count or mesh, a run resumed at step s sees exactly what an
uninterrupted run would have, and a global batch may straddle an epoch boundary. Each process
builds only its own rows. A data.mixture keeps that: ``Mixture`` maps g to (source, k), and the
source's k-th sample is its window ``order_source[k]`` of its own epochs.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np

from jaxlm.config import DataConfig, ModelConfig
from jaxlm.data.mixture import Mixture, mixture_sources, mixture_weights
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
    config asks for (inputs, split) and fits the model. Returns its index; for a ``data.mixture``,
    ``{"sources": {name: index}}`` after checking every source (``ensure_mixture``).

    ``check_split=False`` is for evaluating on another prepared directory, whose inputs and split
    are its own. The checks are cheap (file sizes, no checksums) so every process can afford them.
    """
    if data_cfg.mixture:
        return ensure_mixture(data_cfg, model_cfg)
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
    check_prepared(directory, index, data_cfg, model_cfg, fix)
    if check_split:
        check_split_settings(data_cfg, index)
    return index


def check_prepared(
    directory: Path, index: dict, data_cfg: DataConfig, model_cfg: ModelConfig, fix: str
) -> None:
    """Refuse prepared data of another tokenizer, a vocabulary the model cannot embed, shards that
    are missing or of the wrong size, or fewer tokens than one window; ``fix`` ends each message."""
    wanted = tokenizer_spec(data_cfg.tokenizer)
    if index["tokenizer"] != wanted:
        raise DataError(
            f"{directory} was prepared with tokenizer {index['tokenizer']!r} but data.tokenizer is "
            f"{wanted!r}; {fix}"
        )
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


def ensure_mixture(data_cfg: DataConfig, model_cfg: ModelConfig) -> dict:
    """``{"sources": {name: index}}`` of data.mixture, every source checked as ``ensure_prepared``
    checks data.dir: the first that is missing, empty, of another tokenizer or vocabulary, or
    damaged is one DataError naming it, so no run trains on part of its mixture."""
    tokenizer = data_cfg.tokenizer
    out = {}
    for name, source in mixture_sources(data_cfg).items():
        directory = Path(source.dir)
        what = f"data.mixture source {name!r} ({directory})"
        index = read_index(directory)
        if index is None:
            raise DataError(
                f"{what} holds no prepared data (no index.json); prepare it with `jaxlm prepare --input "
                f"... --tokenizer {tokenizer} --out {directory}`, or remove it from data.mixture"
            )
        fix = (
            f"prepare it again with --tokenizer {tokenizer} (delete {directory} first), or remove it "
            "from data.mixture"
        )
        try:
            check_prepared(directory, index, source, model_cfg, fix)
        except DataError as e:
            raise DataError(f"{what}: {e}") from None
        out[name] = index
    return {"sources": out}


def describe_mixture(data_cfg: DataConfig, index: dict) -> str:
    """One log line: each source's share at step 0 and its train tokens, and those without val."""
    weights, indexes = mixture_weights(data_cfg), index["sources"]
    parts = [
        f"{name} {weights[name]:.1%} ({split_tokens(indexes[name], 'train'):,} train tokens)"
        for name in indexes
    ]
    no_val = [name for name in indexes if split_tokens(indexes[name], "val") == 0]
    line = f"mixture of {len(indexes)} sources: {', '.join(parts)}"
    if data_cfg.mixture_schedule:
        line += f"; weights change at steps {[step for step, _ in data_cfg.mixture_schedule]}"
    if no_val:
        line += f"; no val split in {no_val}, so val/loss weighs the others"
    return line


def split_tokens(index: dict, split: str) -> int:
    """Tokens in ``split`` of what ``ensure_prepared`` returned, summed over a mixture's sources."""
    indexes = index["sources"].values() if "sources" in index else [index]
    return sum(i["splits"][split]["tokens"] for i in indexes)


def _brief(paths: list[str], n: int = 2) -> str:
    return ", ".join(paths[:n]) + (f", ... ({len(paths)} files)" if len(paths) > n else "")


def unigram_entropy(data_cfg: DataConfig, index: dict, max_tokens: int = 1 << 26) -> float:
    """Entropy in nats of the train split's token frequencies (over its first ``max_tokens``): the
    loss of the best model that ignores context, the bar a language model must clear. For a
    mixture, of the sources' frequencies mixed with data.mixture's weights."""
    if data_cfg.mixture:
        sources, weights = mixture_sources(data_cfg), mixture_weights(data_cfg)
        p = sum(
            weights[name] * _unigram(sources[name], index["sources"][name], max_tokens) for name in sources
        )
    else:
        p = _unigram(data_cfg, index, max_tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _unigram(data_cfg: DataConfig, index: dict, max_tokens: int) -> np.ndarray:
    stream = TokenStream.from_index(data_cfg.dir, index, "train")
    counts = np.zeros(index["vocab_size"], np.int64)
    n = min(len(stream), max_tokens)
    for start in range(0, n, 1 << 22):
        counts += np.bincount(stream.read(start, min(start + (1 << 22), n)), minlength=len(counts))
    return counts / max(n, 1)


def _seed32(seed: int | str) -> int:
    # grain reseeds epoch e with seed + e; hashing the user's seed keeps seed 1 from replaying
    # seed 0's epoch 1.
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


def window_order(n_windows: int, seed: int | str, shuffle: bool) -> grain.MapDataset:
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


class _MixtureBatchAt:
    """Step -> this process's rows of that step's global batch from several sources (picklable)."""

    def __init__(
        self,
        windows: list[Windows],
        orders: list[grain.MapDataset],
        mixture: Mixture,
        global_batch: int,
        first_row: int,
        rows: int,
    ):
        self.windows, self.orders, self.mixture = windows, orders, mixture
        self.global_batch, self.first_row, self.rows = global_batch, first_row, rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        g = step * self.global_batch + self.first_row
        out = self.windows[0].empty_batch(self.rows)  # one tokenizer, so one eot id, for all sources
        for row in range(self.rows):
            j, k = self.mixture.locate(g + row)
            self.windows[j].fill(out, row, self.orders[j][k])
        return out


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
    ``data_cfg.workers`` grain worker processes; call ``close()`` to stop them. ``self.windows``
    are data.dir's train windows; for a data.mixture (``index`` from ``ensure_prepared``),
    ``self.mixture`` picks each sample's source from ``self.sources`` (name -> config) and
    ``self.source_windows`` are theirs (``self.mixture`` is None otherwise).
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
        self.global_batch, self.mixture = global_batch, None
        if data_cfg.mixture:
            self.sources = mixture_sources(data_cfg)
            self.source_windows = [
                _train_windows(source, model_cfg, index["sources"][name])
                for name, source in self.sources.items()
            ]
            # Each source shuffles its own windows, its seed tied to its name, not its place.
            orders = [
                window_order(len(w), f"{data_cfg.shuffle_seed}:{name}", data_cfg.shuffle)
                for w, name in zip(self.source_windows, self.sources, strict=True)
            ]
            # Piece (s, weights) deals the samples of train steps s, s+1, ...: g >= (s - 1) * global_batch.
            pieces = [(1, data_cfg.mixture), *data_cfg.mixture_schedule]
            self.mixture = Mixture(
                [[weights[d.dir] for d in self.sources.values()] for _, weights in pieces],
                [(step - 1) * global_batch for step, _ in pieces],
                data_cfg.shuffle_seed,
            )
            batch_at = _MixtureBatchAt(
                self.source_windows, orders, self.mixture, global_batch, first_row, rows
            )
        else:
            self.windows = _train_windows(data_cfg, model_cfg, index)
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

    def mixture_scalars(self, step: int) -> dict[str, float]:
        """After train step ``step`` (1-based; it read samples [(step-1)B, step*B)): each source's
        share of that step's global batch and the epochs of it read so far."""
        B = self.global_batch
        before, after = self.mixture.counts((step - 1) * B), self.mixture.counts(step * B)
        out = {}
        for name, windows, a, b in zip(self.sources, self.source_windows, before, after, strict=True):
            out[f"{name}/share"] = (b - a) / B
            out[f"{name}/epoch"] = b / len(windows)
        return out


def _train_windows(data_cfg: DataConfig, model_cfg: ModelConfig, index: dict) -> Windows:
    stream = TokenStream.from_index(data_cfg.dir, index, "train")
    windows = Windows(stream, model_cfg.seq_len, data_cfg.drop_last, data_cfg.document_masking)
    if len(windows) == 0:
        raise DataError(
            f"the train split of {data_cfg.dir} has {len(stream)} tokens, fewer than one window of "
            f"seq_len+1={model_cfg.seq_len + 1}"
        )
    return windows


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
    if data_cfg.mixture:
        raise DataError(
            f"a mixture has one {split} split per source, not one: evaluate a source's own directory "
            f"(`jaxlm eval --data DIR`, DIR one of {list(data_cfg.mixture)})"
        )
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
