"""Cut a split's token stream into training windows in which every position contributes loss.

Window i covers stream tokens [i*T, i*T + T + 1): inputs are its first T tokens and targets its
last T, so consecutive windows share one token and every stream token but the first is a target
exactly once per epoch. Nothing is dropped at document boundaries: documents are packed back to
back, each ending with its eot token, and ``segment_ids``/``positions`` say where each one starts
so attention can be kept inside a document.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class TokenStream:
    """The shards of one split seen as one flat token array.

    Stores only paths and lengths, so it pickles cheaply to loader worker processes; each process
    opens the memmaps on first use.
    """

    def __init__(
        self, paths: Sequence[str | Path], dtype: str, eot_id: int, lengths: Sequence[int] | None = None
    ):
        self.paths = [str(p) for p in paths]
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.eot_id = int(eot_id)
        if lengths is None:
            lengths = [os.path.getsize(p) // self.dtype.itemsize for p in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        self._maps: list[np.ndarray] | None = None

    @classmethod
    def from_index(cls, directory: str | Path, index: dict[str, Any], split: str) -> TokenStream:
        shards = index["splits"][split]["shards"]
        return cls(
            [Path(directory) / s["name"] for s in shards],
            index["dtype"],
            index["eot_id"],
            [s["tokens"] for s in shards],
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                np.memmap(p, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)
                for p, n in zip(self.paths, np.diff(self.offsets), strict=True)
            ]
        return self._maps

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) across shard boundaries; a read-only view when inside one shard."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"read({start}, {stop}) outside a stream of {len(self)} tokens")
        maps = self._open()
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        if start == stop:
            return np.zeros(0, self.dtype)
        pieces = []
        while start < stop:
            lo, hi = int(self.offsets[shard]), int(self.offsets[shard + 1])
            pieces.append(maps[shard][start - lo : min(stop, hi) - lo])
            start = min(stop, hi)
            shard += 1
        return np.asarray(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)


class Windows:
    """The windows of one stream: ``len(windows)`` of them, each a dict of [seq_len] arrays.

    ``inputs``/``targets`` int32, ``loss_mask`` float32 (0 on the padding of a final partial
    window), ``segment_ids`` int32 numbering the documents in the window from 1 (0 on padding) and
    ``positions`` int32 restarting at 0 at each document start and at the window start. With
    ``document_masking=False`` every window is a single segment with positions 0..T-1.
    """

    def __init__(self, stream: TokenStream, seq_len: int, drop_last: bool, document_masking: bool = True):
        self.stream, self.seq_len, self.drop_last = stream, int(seq_len), bool(drop_last)
        self.document_masking = bool(document_masking)
        n_targets = max(len(stream) - 1, 0)
        self._n = n_targets // self.seq_len if drop_last else -(-n_targets // self.seq_len)

    def __len__(self) -> int:
        return self._n

    def empty_batch(self, rows: int) -> dict[str, np.ndarray]:
        """All-padding rows: eot tokens, loss mask 0, segment 0."""
        T, eot = self.seq_len, self.stream.eot_id
        return {
            "inputs": np.full((rows, T), eot, np.int32),
            "targets": np.full((rows, T), eot, np.int32),
            "loss_mask": np.zeros((rows, T), np.float32),
            "segment_ids": np.zeros((rows, T), np.int32),
            "positions": np.zeros((rows, T), np.int32),
        }

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out = self.empty_batch(1)
        self.fill(out, 0, i)
        return {k: v[0] for k, v in out.items()}

    def batch(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """Windows ``ids`` stacked into [len(ids), seq_len] arrays."""
        out = self.empty_batch(len(ids))
        for row, i in enumerate(ids):
            self.fill(out, row, int(i))
        return out

    def fill(self, out: dict[str, np.ndarray], row: int, i: int) -> None:
        """Write window ``i`` into row ``row`` of ``out`` (which starts as all padding)."""
        if not 0 <= i < self._n:
            raise IndexError(f"window {i} out of range for {self._n} windows")
        T = self.seq_len
        start = i * T
        w = self.stream.read(start, min(start + T + 1, len(self.stream)))
        L = len(w) - 1  # real targets in this window; < T only for the final partial window
        out["inputs"][row, :L] = w[:-1]
        out["targets"][row, :L] = w[1:]
        out["loss_mask"][row, :L] = 1.0
        if not self.document_masking:
            out["segment_ids"][row, :L] = 1
            out["positions"][row] = np.arange(T, dtype=np.int32)
            return
        # Position j counts from the start of its document, or from the window start for a document
        # that began in an earlier window: the model sees nothing before the window, and positions
        # stay below seq_len (the rows of a learned position table).
        after_eot = np.flatnonzero(w[: L - 1] == self.stream.eot_id) + 1
        seg_start = np.zeros(L, np.int64)
        seg_start[after_eot] = after_eot
        np.maximum.accumulate(seg_start, out=seg_start)
        out["positions"][row, :L] = np.arange(L) - seg_start
        seg = np.zeros(L, np.int32)
        seg[after_eot] = 1
        out["segment_ids"][row, :L] = np.cumsum(seg) + 1
