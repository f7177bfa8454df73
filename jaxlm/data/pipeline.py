"""Batches for training and evaluation from a prepared directory.

The global sample index g = step * global_batch + row is the only state: epoch g // n_windows,
window order[g], where ``order`` is grain's seeded shuffle that changes every epoch. So the batch of
step s is the same for any process count or mesh, a run resumed at step s sees exactly what an
uninterrupted run would have, and a global batch may straddle an epoch boundary. Each process
builds only its own rows. A data.mixture keeps that: ``Mixture`` maps g to (source, k), and the
source's k-th sample is its window ``order_source[k]`` of its own epochs.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np

from jaxlm.config import DataConfig, ModelConfig, source_name
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


def mixture_sources(data_cfg: DataConfig) -> dict[str, DataConfig]:
    """{name: a plain DataConfig of that directory} for each data.mixture source, ordered by name
    (the order the mixture deals samples in, so the order of the keys does not matter)."""
    sources = {
        source_name(directory): dataclasses.replace(data_cfg, dir=directory, mixture={}, mixture_schedule=())
        for directory in data_cfg.mixture
    }
    return dict(sorted(sources.items()))


def mixture_weights(data_cfg: DataConfig) -> dict[str, float]:
    """{name: share} of data.mixture (the weights from step 0), normalised to sum 1."""
    total = sum(data_cfg.mixture.values())
    by_name = {source_name(d): w / total for d, w in data_cfg.mixture.items()}
    return {name: by_name[name] for name in mixture_sources(data_cfg)}


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


def mixture_loss(data_cfg: DataConfig, losses: dict[str, float]) -> float:
    """The mixture's val loss from its sources' ({name: loss}, those with a val split): their mean
    weighted by data.mixture (the step-0 weights, so it stays comparable along a schedule), or the
    plain mean when those weights give all of them 0."""
    weights = mixture_weights(data_cfg)
    total = sum(weights[name] for name in losses)
    if total == 0:
        return sum(losses.values()) / len(losses)
    return sum(weights[name] * loss for name, loss in losses.items()) / total


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


class Mixture:
    """Which source, and which of that source's samples, feed global sample g: a pure function of g,
    the seed and the weights, so the batch of step s stays the same for any process count or mesh
    and a resumed run sees what an uninterrupted one would have.

    Within a piece of constant weights, samples are dealt out by a chain of Beatty sequences: among
    the samples that no source before j took, the m-th goes to source j exactly when
    ``taken_j(m + 1) > taken_j(m)``, where ``taken_j(m) = (m * W_j + c_j) // R_j`` counts the first m
    of them that source j takes, W_j is j's weight in units of 2^-20, R_j the weight of sources j
    and after, and c_j in [0, R_j) a seeded offset. So a source's share of any n consecutive
    samples is within J (the number of sources) of n times its weight, and how many samples each
    source had before g is O(J) integer arithmetic, never a scan from sample 0.

    ``starts[i]`` is the first global sample of piece i (0 for the first). Each source's sample
    counter runs on across pieces: its k-th sample overall is the k-th of its own window stream.
    """

    def __init__(self, weights: list[list[float]], starts: list[int], seed: int):
        self.starts = list(starts)
        self.pieces = [_Piece(w, seed) for w in weights]
        self.before = [[0] * len(weights[0])]  # each source's samples before each piece
        for i in range(1, len(starts)):
            taken = self.pieces[i - 1].counts(starts[i] - starts[i - 1])
            self.before.append([a + b for a, b in zip(self.before[-1], taken, strict=True)])

    def locate(self, g: int) -> tuple[int, int]:
        """(source j, k): global sample g is source j's k-th sample (counting from 0)."""
        i = bisect.bisect_right(self.starts, g) - 1
        j, k = self.pieces[i].locate(g - self.starts[i])
        return j, self.before[i][j] + k

    def counts(self, g: int) -> list[int]:
        """How many of the global samples before g each source had."""
        i = bisect.bisect_right(self.starts, g) - 1
        return [a + b for a, b in zip(self.before[i], self.pieces[i].counts(g - self.starts[i]), strict=True)]


_WEIGHT_UNITS = 1 << 20  # weights as integers: exact arithmetic, the same on every machine


class _Piece:
    """The chain of one piece of constant weights (see Mixture)."""

    def __init__(self, weights: list[float], seed: int):
        total = sum(weights)
        self.units = [max(1, round(w / total * _WEIGHT_UNITS)) if w > 0 else 0 for w in weights]
        self.rest = [sum(self.units[j:]) for j in range(len(weights))]
        self.offsets = [_seed32(f"{seed}:mixture:{j}") % max(r, 1) for j, r in enumerate(self.rest)]

    def _taken(self, j: int, m: int) -> int:
        return (m * self.units[j] + self.offsets[j]) // self.rest[j]

    def locate(self, m: int) -> tuple[int, int]:
        for j, units in enumerate(self.units):
            if units:
                before = self._taken(j, m)
                if self._taken(j, m + 1) > before:
                    return j, before
                m -= before
        raise AssertionError("unreachable: the last weighted source takes every sample that reaches it")

    def counts(self, m: int) -> list[int]:
        out = []
        for j, units in enumerate(self.units):
            out.append(self._taken(j, m) if units else 0)
            m -= out[-1]
        return out


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
