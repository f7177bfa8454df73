"""Which source of a data.mixture, and which of that source's samples, feed global sample g.

A pure function of g, the seed and the weights (``Mixture``), so everything the pipeline promises
for one directory holds for a mixture: the batch of step s is the same for any process count or
mesh, and a run resumed at step s reads what an uninterrupted run would have. Sample g being source
j's k-th sample, the pipeline gives it window ``order_j[k]`` of j's own epochs.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib

from jaxlm.config import DataConfig, source_name


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


def mixture_loss(data_cfg: DataConfig, losses: dict[str, float]) -> float:
    """The mixture's val loss from its sources' ({name: loss}, those with a val split): their mean
    weighted by data.mixture (the step-0 weights, so it stays comparable along a schedule), or the
    plain mean when those weights give all of them 0."""
    weights = mixture_weights(data_cfg)
    total = sum(weights[name] for name in losses)
    if total == 0:
        return sum(losses.values()) / len(losses)
    return sum(weights[name] * loss for name, loss in losses.items()) / total


class Mixture:
    """Which source, and which of that source's samples, feed global sample g: a pure function of g,
    the seed and the weights, so the batch of step s stays the same for any process count or mesh
    and a resumed run sees what an uninterrupted one would have.

    Within a piece of constant weights, samples are dealt out by a chain of Beatty sequences: among
    the samples that no source before j took, the m-th goes to source j exactly when
    ``taken_j(m + 1) > taken_j(m)``, where ``taken_j(m) = (m * W_j + c_j) // R_j`` counts the first m
    of them that source j takes, W_j is j's weight in units of 2^-20, R_j the weight of sources j
    and after, and c_j in [0, R_j) a seeded offset. So within a piece a source's count among any n
    consecutive samples is within J (the number of sources) of n times its weight, and how many
    samples each source had before g is O(J) integer arithmetic, never a scan from sample 0.

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
        self.offsets = [_hash(f"{seed}:mixture:{j}") % max(r, 1) for j, r in enumerate(self.rest)]

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


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
