"""Data pipeline behaviour: exact target coverage, document segments, determinism, safe preparation."""

from __future__ import annotations

import dataclasses
import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm.config import DataConfig, ModelConfig
from jaxlm.data import prepare as prepare_mod
from jaxlm.data.pipeline import Loader, ensure_prepared, eval_batches, unigram_entropy, window_order
from jaxlm.data.prepare import DataError, prepare, shakespeare_files
from jaxlm.data.segmenter import TokenStream, Windows
from jaxlm.data.tokenizer import get_tokenizer

EOT = 256  # the bytes tokenizer's end-of-document id


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_stream(directory: Path, tokens: np.ndarray, cuts: list[int]) -> TokenStream:
    """Write ``tokens`` as shards split at ``cuts`` and open them as one stream."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(tokens)}), len(tokens)]
    paths = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        path = directory / f"train_{k:05d}.bin"
        tokens[lo:hi].astype("<u2").tofile(path)
        paths.append(path)
    return TokenStream(paths, "uint16", EOT)


def brute_force_segments(stream: np.ndarray, start: int, length: int) -> tuple[list[int], list[int]]:
    """Positions and segment ids by scanning back to the previous eot (or the window start)."""
    starts = []
    for p in range(start, start + length):
        d = p
        while d > start and stream[d - 1] != EOT:
            d -= 1
        starts.append(d)
    positions = [p - d for p, d in zip(range(start, start + length), starts, strict=True)]
    segments = [1]
    for j in range(1, length):
        segments.append(segments[-1] + (starts[j] != starts[j - 1]))
    return positions, segments[:length]


corpora = st.lists(st.lists(st.integers(0, 255), max_size=30), min_size=1, max_size=12).map(
    lambda docs: np.array([t for d in docs for t in (*d, EOT)], dtype=np.int64)
)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def prepared(tmp_path: Path, texts: list[str], name: str = "data", **cfg) -> tuple[DataConfig, dict]:
    """A bytes-tokenized corpus of ``texts`` (one document each) and its DataConfig."""
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    data_cfg = DataConfig(
        inputs=(str(corpus),),
        dir=str(tmp_path / name),
        tokenizer="bytes",
        prefetch=2,
        **{"val_fraction": 0.0, **cfg},
    )
    index = prepare(
        list(data_cfg.inputs),
        "bytes",
        data_cfg.dir,
        data_cfg.val_fraction,
        seed=data_cfg.split_seed,
        workers=0,
        progress=False,
    )
    return data_cfg, index


def random_texts(n: int, seed: int = 0, max_len: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc{i}:" + "".join(rng.choice(list("abc de\n"), rng.integers(0, max_len))) for i in range(n)]


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


TINY = ModelConfig(vocab_size=257, vocab_multiple=1, seq_len=8)


# --------------------------------------------------------------------------------------------
# Segmenter: coverage and segments on random corpora
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    tokens=corpora,
    cuts=st.lists(st.integers(1, 400), max_size=4),
    seq_len=st.integers(1, 12),
    drop_last=st.booleans(),
)
def test_every_target_exactly_once_per_epoch(tokens, cuts, seq_len, drop_last):
    with tempfile.TemporaryDirectory() as d:
        stream = write_stream(Path(d), tokens, cuts)
        windows = Windows(stream, seq_len, drop_last)
        n = len(tokens)
        seen = []
        for i in range(len(windows)):
            w = windows[i]
            assert all(w[k].shape == (seq_len,) for k in w)
            assert w["inputs"].dtype == w["targets"].dtype == np.int32 and w["loss_mask"].dtype == np.float32
            for j in np.flatnonzero(w["loss_mask"]):
                offset = i * seq_len + j + 1
                assert w["targets"][j] == tokens[offset] and w["inputs"][j] == tokens[offset - 1]
                seen.append(offset)
            pad = w["loss_mask"] == 0
            assert (w["segment_ids"][pad] == 0).all() and (w["targets"][pad] == EOT).all()
        if drop_last:
            assert seen == list(range(1, 1 + len(windows) * seq_len))
            assert 0 <= (n - 1) - len(seen) < seq_len
        else:
            assert seen == list(range(1, n))


@settings(max_examples=60, deadline=None)
@given(tokens=corpora, cuts=st.lists(st.integers(1, 400), max_size=4), seq_len=st.integers(1, 12))
def test_segments_and_positions_match_brute_force(tokens, cuts, seq_len):
    with tempfile.TemporaryDirectory() as d:
        stream = write_stream(Path(d), tokens, cuts)
        masked, plain = (
            Windows(stream, seq_len, False),
            Windows(stream, seq_len, False, document_masking=False),
        )
        for i in range(len(masked)):
            w, p = masked[i], plain[i]
            real = int(w["loss_mask"].sum())
            positions, segments = brute_force_segments(tokens, i * seq_len, real)
            assert w["positions"][:real].tolist() == positions
            assert w["segment_ids"][:real].tolist() == segments
            assert (p["positions"] == np.arange(seq_len)).all()
            assert (p["segment_ids"] == (p["loss_mask"] > 0)).all()


def test_token_stream_pickles_only_paths(tmp_path):
    tokens = np.arange(100) % 300
    stream = write_stream(tmp_path, tokens, [30, 70])
    assert stream.read(25, 75).tolist() == tokens[25:75].tolist()  # crosses two shard boundaries
    state = pickle.dumps(stream)
    assert len(state) < 2000  # no memmaps or token arrays travel to workers
    assert pickle.loads(state).read(0, 100).tolist() == tokens.tolist()


# --------------------------------------------------------------------------------------------
# Loader: determinism across processes, resume, epochs
# --------------------------------------------------------------------------------------------


def test_process_slices_partition_the_global_batch(tmp_path):
    data_cfg, index = prepared(tmp_path, random_texts(40), document_masking=True)
    full = take(Loader(data_cfg, TINY, index, 8, 0), 5)
    for count in (2, 4):
        parts = [take(Loader(data_cfg, TINY, index, 8, 0, p, count), 5) for p in range(count)]
        for step in range(5):
            for key in full[step]:
                joined = np.concatenate([parts[p][step][key] for p in range(count)])
                assert joined.shape == (8, TINY.seq_len)
                np.testing.assert_array_equal(joined, full[step][key])
    with pytest.raises(DataError, match="not divisible"):
        Loader(data_cfg, TINY, index, 6, 0, 0, 4)


def test_resume_yields_the_batches_an_uninterrupted_run_would(tmp_path):
    data_cfg, index = prepared(tmp_path, random_texts(30))
    uninterrupted = take(Loader(data_cfg, TINY, index, 4, 0), 12)
    resumed = take(Loader(dataclasses.replace(data_cfg, prefetch=0), TINY, index, 4, 7), 5)
    for a, b in zip(uninterrupted[7:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_shuffle_differs_per_epoch_and_is_reproducible_from_the_seed(tmp_path):
    n = 37
    order = window_order(n, seed=3, shuffle=True)
    epochs = [[order[e * n + k] for k in range(n)] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = window_order(n, seed=3, shuffle=True)
    assert [again[k] for k in range(3 * n)] == sum(epochs, [])
    assert [window_order(n, 4, True)[k] for k in range(n)] != epochs[0]
    assert [window_order(n, 3, False)[k] for k in range(2 * n)] == list(range(n)) * 2

    # Batches are exactly those windows, and a global batch straddles the epoch boundary.
    data_cfg, index = prepared(tmp_path, random_texts(20))
    windows = Windows(
        TokenStream.from_index(data_cfg.dir, index, "train"), TINY.seq_len, data_cfg.drop_last, False
    )
    batch = 8
    assert len(windows) % batch  # so some batch holds the end of one epoch and the start of the next
    order = window_order(len(windows), data_cfg.shuffle_seed, True)
    steps = -(-len(windows) // batch) + 1
    for step, got in enumerate(take(Loader(data_cfg, TINY, index, batch, 0), steps)):
        want = windows.batch([order[g] for g in range(step * batch, (step + 1) * batch)])
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_give_the_same_batches(tmp_path):
    data_cfg, index = prepared(tmp_path, random_texts(20))
    in_process = take(Loader(data_cfg, TINY, index, 4, 3), 4)
    workers = take(Loader(dataclasses.replace(data_cfg, workers=1), TINY, index, 4, 3), 4)
    for a, b in zip(in_process, workers, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_eval_batches_count_every_val_target_once(tmp_path):
    data_cfg, index = prepared(tmp_path, random_texts(60, max_len=40), val_fraction=0.3)
    val_tokens = index["splits"]["val"]["tokens"]
    full = list(eval_batches(data_cfg, TINY, index, 4, 0))
    assert all(b["inputs"].shape == (4, TINY.seq_len) for b in full)
    assert sum(b["loss_mask"].sum() for b in full) == val_tokens - 1
    n_windows = -(-(val_tokens - 1) // TINY.seq_len)
    assert len(full) == -(-n_windows // 4)
    padded_rows = len(full) * 4 - n_windows
    assert (full[-1]["loss_mask"].sum(axis=1)[4 - padded_rows :] == 0).all()
    halves = [list(eval_batches(data_cfg, TINY, index, 4, 0, p, 2)) for p in range(2)]
    for k, b in enumerate(full):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][k]["targets"], halves[1][k]["targets"]]), b["targets"]
        )
    assert len(list(eval_batches(data_cfg, TINY, index, 4, 2))) == 2
    train = eval_batches(data_cfg, TINY, index, 4, 0, split="train")
    assert sum(b["loss_mask"].sum() for b in train) == index["splits"]["train"]["tokens"] - 1


def test_eval_without_val_split_says_how_to_get_one(tmp_path):
    data_cfg, index = prepared(tmp_path, random_texts(5))
    with pytest.raises(DataError, match="val_fraction"):
        eval_batches(data_cfg, TINY, index, 4, 0)


# --------------------------------------------------------------------------------------------
# Prepare: splits, idempotence, atomicity, determinism
# --------------------------------------------------------------------------------------------


def split_documents(directory: str, index: dict, split: str) -> list[str]:
    stream = TokenStream.from_index(directory, index, split)
    tokens = stream.read(0, len(stream))
    tok = get_tokenizer("bytes")
    docs, start = [], 0
    for end in np.flatnonzero(tokens == EOT):
        docs.append(tok.decode(tokens[start:end].tolist()))
        start = end + 1
    assert start == len(tokens)  # every split ends with a whole document
    return docs


def test_val_split_is_disjoint_by_document_and_stable(tmp_path):
    texts = random_texts(80)
    data_cfg, index = prepared(tmp_path, texts, val_fraction=0.2, split_seed=5)
    train, val = split_documents(data_cfg.dir, index, "train"), split_documents(data_cfg.dir, index, "val")
    assert val and not set(train) & set(val) and sorted(train + val) == sorted(texts)
    assert index["splits"]["val"]["documents"] == len(val) and index["splits"]["train"]["documents"] == len(
        train
    )
    again = prepare(
        [str(tmp_path / "data.jsonl")], "bytes", str(tmp_path / "again"), 0.2, seed=5, progress=False
    )
    assert split_documents(str(tmp_path / "again"), again, "val") == val


def test_small_corpus_still_gets_one_val_document(tmp_path):
    texts = ["first document " * 5, "second document that ends up held out " * 3]
    data_cfg, index = prepared(tmp_path, texts, val_fraction=0.01, split_seed=1)
    # Tiny shards so holding out the last document truncates one shard and deletes others.
    index = prepare(
        list(data_cfg.inputs), "bytes", str(tmp_path / "small"), 0.01, seed=1, shard_tokens=16, progress=False
    )
    directory = tmp_path / "small"
    assert split_documents(str(directory), index, "val") == [texts[1]]
    assert split_documents(str(directory), index, "train") == [texts[0]]
    on_disk = sorted(p.name for p in directory.glob("*.bin"))
    listed = sorted(s["name"] for split in index["splits"].values() for s in split["shards"])
    assert on_disk == listed
    for split in index["splits"].values():
        for shard in split["shards"]:
            assert prepare_mod._sha256(directory / shard["name"]) == shard["sha256"]
            assert 0 < shard["tokens"] <= 16


def test_prepare_is_idempotent_and_notices_changed_inputs(tmp_path):
    data_cfg, index = prepared(tmp_path, random_texts(10))
    files = sorted(Path(data_cfg.dir).iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert prepare(list(data_cfg.inputs), "bytes", data_cfg.dir, 0.0, progress=False) == index
    assert [f.stat().st_mtime_ns for f in sorted(Path(data_cfg.dir).iterdir())] == mtimes
    write_jsonl(tmp_path / "data.jsonl", random_texts(11))
    changed = prepare(list(data_cfg.inputs), "bytes", data_cfg.dir, 0.0, progress=False)
    assert changed["splits"]["train"]["documents"] == 11


def test_interrupted_prepare_leaves_previous_data_intact(tmp_path, monkeypatch):
    data_cfg, index = prepared(tmp_path, random_texts(10))
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in Path(data_cfg.dir).iterdir()}
    write_jsonl(tmp_path / "data.jsonl", random_texts(12))

    def crash(self, tokens):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod._ShardWriter, "write", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(list(data_cfg.inputs), "bytes", data_cfg.dir, 0.0, progress=False)
    after = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in Path(data_cfg.dir).iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "data.jsonl"]  # no temp dirs left


def test_output_is_identical_for_any_worker_count_and_piece_size(tmp_path, monkeypatch):
    texts = random_texts(30, max_len=400)
    data_cfg, one = prepared(tmp_path, texts)
    monkeypatch.setattr(prepare_mod, "_TASK_CHARS", 500)  # many tasks in flight through the pool
    two = prepare(list(data_cfg.inputs), "bytes", str(tmp_path / "w2"), 0.0, workers=2, progress=False)
    assert one["splits"] == two["splits"]

    # A long text file is tokenized in pieces cut where GPT-2 pre-tokens cannot span: same tokens.
    text = "".join(f"Line {i}:  it's {i * 7} words,\n\nNext\r\nCRLF \nspace\n  indent\n" for i in range(300))
    (tmp_path / "long.txt").write_text(text)
    monkeypatch.setattr(prepare_mod, "_PIECE_BYTES", 100)
    index = prepare(
        [str(tmp_path / "long.txt")], "gpt2", str(tmp_path / "pieces"), 0.0, workers=0, progress=False
    )
    stream = TokenStream.from_index(tmp_path / "pieces", index, "train")
    tok = get_tokenizer("gpt2")
    assert stream.read(0, len(stream)).tolist() == [*tok.encode(text), tok.eot_id]


def test_shakespeare_with_gpt2_round_trips(tmp_path):
    files = shakespeare_files()
    assert len(files) == 42
    index = prepare(
        [str(f) for f in files[:2]], "gpt2", str(tmp_path / "shk"), 0.0, workers=0, progress=False
    )
    assert index["dtype"] == "uint16" and index["vocab_size"] == 50257
    tokens = TokenStream.from_index(tmp_path / "shk", index, "train").read(
        0, index["splits"]["train"]["tokens"]
    )
    eots = np.flatnonzero(tokens == index["eot_id"])
    assert len(eots) == 2 and eots[-1] == len(tokens) - 1
    assert get_tokenizer("gpt2").decode(tokens[: eots[0]].tolist()) == files[0].read_text()


def test_text_jsonl_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text document")
    write_jsonl(tmp_path / "b.jsonl", ["json one", "", "json two"])
    pq.write_table(
        pa.table({"text": ["pq one", None, "pq two", "pq three"], "id": [1, 2, 3, 4]}),
        tmp_path / "c.parquet",
        row_group_size=2,
    )
    index = prepare(
        [str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "c.parquet")],
        "bytes",
        str(tmp_path / "out"),
        0.0,
        progress=False,
    )
    docs = split_documents(str(tmp_path / "out"), index, "train")
    assert docs == ["plain text document", "json one", "json two", "pq one", "pq two", "pq three"]
    assert [Path(i["path"]).name for i in index["inputs"]] == ["a.txt", "b.jsonl", "c.parquet"]


# --------------------------------------------------------------------------------------------
# Errors name the problem and the fix
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_data_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="matches no file"):
        prepare([str(tmp_path / "missing*.jsonl")], "bytes", out, progress=False)
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match="no documents"):
        prepare([str(tmp_path / "empty.*")], "bytes", out, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: line has no 'text' field"):
        prepare([str(tmp_path / "bad.jsonl")], "bytes", out, progress=False)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        prepare([str(tmp_path / "broken.jsonl")], "bytes", out, progress=False)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported extension '.csv'"):
        prepare([str(tmp_path / "data.csv")], "bytes", out, progress=False)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        prepare([str(tmp_path / "nocol.parquet")], "bytes", out, progress=False)
    (tmp_path / "user_dir").mkdir()
    (tmp_path / "user_dir" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not prepared data"):
        prepare([str(tmp_path / "bad.jsonl")], "bytes", str(tmp_path / "user_dir"), progress=False)
    assert not Path(out).exists()


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9 ok")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes " + b"x" * 385 + b" \xc3")  # 3 of 400 bytes
    index = prepare([str(tmp_path / "*.txt")], "bytes", str(tmp_path / "out"), progress=False)
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: 3 bytes that are not valid UTF-8 were replaced by U+FFFD in 1 doc")
    assert f"{tmp_path / 'b.txt'} 0.75% (3 of 400 bytes)" in warning and "a.txt" not in warning
    assert index["bad_bytes"] == {"documents": 1, "bytes": 3}
    assert split_documents(str(tmp_path / "out"), index, "train") == [
        "café ok",
        "bad \ufffd\ufffd bytes " + "x" * 385 + " \ufffd",
    ]


def test_ensure_prepared_prepares_once_then_checks_the_model_fits(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", random_texts(10))
    data_cfg = DataConfig(inputs=(str(corpus),), dir=str(tmp_path / "d"), tokenizer="bytes", val_fraction=0.2)
    index = ensure_prepared(data_cfg, TINY)
    assert index["splits"]["val"]["documents"] >= 1
    with pytest.raises(DataError, match=r"fewer than one window of seq_len\+1=100001"):
        ensure_prepared(data_cfg, dataclasses.replace(TINY, seq_len=100_000))
    with pytest.raises(DataError, match="tokenizer 'bytes' but data.tokenizer is 'gpt2'.*delete"):
        ensure_prepared(dataclasses.replace(data_cfg, tokenizer="gpt2"), TINY)
    with pytest.raises(DataError, match="vocab_size 257.*model.vocab_size is 200"):
        ensure_prepared(data_cfg, dataclasses.replace(TINY, vocab_size=200))
    shard = Path(data_cfg.dir) / index["splits"]["train"]["shards"][0]["name"]
    with open(shard, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="bytes but index.json records"):
        ensure_prepared(data_cfg, TINY)
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        ensure_prepared(data_cfg, TINY)


def test_cli_prepares_and_reports_errors_on_one_line(tmp_path, capsys):
    from jaxlm.cli import main as cli

    corpus = write_jsonl(tmp_path / "c.jsonl", random_texts(5))
    out = tmp_path / "out"
    args = ["prepare", "--input", str(corpus), "--tokenizer", "bytes", "--out", str(out), "--workers", "0"]
    assert cli(args) == 0
    assert json.loads((out / "index.json").read_text())["splits"]["train"]["documents"] >= 1
    capsys.readouterr()
    assert cli(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert cli(["prepare", "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "nope.txt" in err[0] and "--input" in err[1]


def test_unigram_entropy_is_the_entropy_of_token_frequencies(tmp_path):
    # "ab" per document: tokens a, b and eot, each a third of the stream -> ln 3 nats
    data_cfg, index = prepared(tmp_path, ["ab"] * 50)
    # float64 numpy: rounding ~1e-16 on any CPU; one count off by one in 150 moves it by ~1e-3
    assert unigram_entropy(data_cfg, index) == pytest.approx(np.log(3), rel=1e-9)


def test_ensure_prepared_refuses_another_split_or_other_inputs(tmp_path):
    """The config's split and inputs are checked against index.json, naming both values and the fix;
    the shuffle seed is not part of the split."""
    corpus = write_jsonl(tmp_path / "c.jsonl", random_texts(20))
    data_cfg = DataConfig(inputs=(str(corpus),), dir=str(tmp_path / "d"), tokenizer="bytes", val_fraction=0.2)
    index = ensure_prepared(data_cfg, TINY)
    index_bytes = (Path(data_cfg.dir) / "index.json").read_bytes()
    with pytest.raises(DataError, match=r"data.val_fraction=0.2 but the config has 0.1; point data.dir"):
        ensure_prepared(dataclasses.replace(data_cfg, val_fraction=0.1), TINY)
    with pytest.raises(DataError, match=r"data.split_seed=0 but the config has 3;.*delete"):
        ensure_prepared(dataclasses.replace(data_cfg, split_seed=3), TINY)
    other = write_jsonl(tmp_path / "other.jsonl", random_texts(20, seed=1))
    with pytest.raises(DataError, match=r"prepared from 1 other input.*c.jsonl.*other.jsonl"):
        ensure_prepared(dataclasses.replace(data_cfg, inputs=(str(other),)), TINY)
    assert (Path(data_cfg.dir) / "index.json").read_bytes() == index_bytes  # nothing was re-prepared

    # Another shuffle seed: the same split (no error), another window order.
    reshuffled = dataclasses.replace(data_cfg, shuffle_seed=7)
    assert ensure_prepared(reshuffled, TINY) == index
    a, b = (take(Loader(c, TINY, index, 4, 0), 1)[0]["inputs"] for c in (data_cfg, reshuffled))
    assert not np.array_equal(a, b)


def test_default_config_makes_every_train_target_count_once_per_epoch(tmp_path):
    """The default keeps the final partial window (padded, loss mask 0): one epoch's masked targets
    are exactly the train stream but its first token."""
    data_cfg, index = prepared(tmp_path, random_texts(30))
    assert data_cfg.drop_last == DataConfig().drop_last
    n_tokens = index["splits"]["train"]["tokens"]
    assert (n_tokens - 1) % TINY.seq_len, "the corpus must end in a partial window for this test"
    loader = Loader(dataclasses.replace(data_cfg, shuffle=False), TINY, index, 1, 0)
    epoch = take(loader, len(loader.windows))
    stream = np.fromfile(Path(data_cfg.dir) / index["splits"]["train"]["shards"][0]["name"], "<u2")
    targets = np.concatenate([b["targets"][0][b["loss_mask"][0] > 0] for b in epoch])
    np.testing.assert_array_equal(targets, stream[1:])


def test_shipped_experiments_never_share_a_directory_with_another_split():
    """Two experiments on one data.dir must ask for the same prepared data, or the second run's
    config.json would record a split it did not get (ensure_prepared now refuses it)."""
    from jaxlm.config import load_config

    seen: dict[str, tuple] = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.py")):
        d = load_config(path).data
        settings_ = (d.inputs, d.tokenizer, d.val_fraction, d.split_seed)
        assert seen.setdefault(d.dir, settings_) == settings_, f"{path.name} and another share {d.dir}"
