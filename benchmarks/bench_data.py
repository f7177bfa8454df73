"""Data pipeline throughput: prepare (MB/s of text) and loader (tokens/s delivered).

    python benchmarks/bench_data.py                 # full run: ~2 min on a 2-core CPU
    python benchmarks/bench_data.py --synthetic-mb 20 --seconds 5   # quick look

Prepare is measured on the Shakespeare corpus and on a synthetic corpus made by repeating it;
the loader on GPT-2-124M shapes (seq_len 1024, global batch 32, shuffle on) reading the synthetic
corpus, with and without document masking, with loader worker processes, and on a mixture of the
synthetic corpus and Shakespeare.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from jaxlm.data.prepare import prepare, shakespeare_files


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, child


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children: on a shared machine, throughput per
    CPU-second says what the code costs regardless of what else is running."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_prepare(inputs: list[str], out: Path, workers: int, label: str) -> Path:
    mb = sum(Path(p).stat().st_size for p in inputs) / 1e6
    t0, c0 = time.perf_counter(), cpu_seconds()
    index = prepare(inputs, "gpt2", str(out), val_fraction=0.01, workers=workers, progress=False)
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    tokens = index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
    own, child = peak_rss_mb()
    print(
        f"prepare  {label:<28} {mb:8.1f} MB  {elapsed:6.1f} s  {mb / elapsed:6.2f} MB/s  "
        f"{tokens / elapsed / 1e6:5.2f} M tokens/s  {mb / cpu:5.2f} MB per CPU-s  workers={workers}  "
        f"peak RSS main {own:.0f} MB, "
        f"worker {child:.0f} MB"
    )
    return out


def bench_loader(directory: Path, seconds: float, label: str, **data_overrides) -> None:
    # Imported here so prepare's spawned workers, which re-import this script, do not load grain.
    from jaxlm.config import DataConfig, ModelConfig
    from jaxlm.data.pipeline import Loader, ensure_prepared

    data_cfg = DataConfig(dir=str(directory), tokenizer="gpt2", shuffle=True, **data_overrides)
    model_cfg = ModelConfig()  # GPT-2 124M: seq_len 1024
    index = ensure_prepared(data_cfg, model_cfg, check_split=False)  # the directory prepared above
    batches = Loader(data_cfg, model_cfg, index, global_batch=32, start_step=0)
    next(batches)  # start-up (worker processes, eot scan) is not throughput
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    while time.perf_counter() - t0 < seconds:
        batch = next(batches)
        n += batch["inputs"].size
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    batches.close()
    rate = n / elapsed / 1e6
    # CPU time of loader worker processes is not counted (they are still running here).
    per_cpu = f"{n / cpu / 1e6:6.2f} M tokens per CPU-s" if not data_overrides.get("workers") else ""
    print(f"loader   {label:<28} {rate:6.2f} M tokens/s  {per_cpu}  ({n // 1024} windows in {elapsed:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-mb", type=float, default=200, help="size of the repeated corpus")
    parser.add_argument("--seconds", type=float, default=20, help="duration of each loader measurement")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes for prepare")
    args = parser.parse_args()
    print(f"host: {platform.processor() or platform.machine()}, python {platform.python_version()}")

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        plays = [str(p) for p in shakespeare_files()]
        bench_prepare(plays, work / "shakespeare_1", 0, "shakespeare (42 plays)")
        bench_prepare(plays, work / "shakespeare", args.workers, "shakespeare (42 plays)")

        # Synthetic corpus: the whole of Shakespeare per file (one ~5 MB document each, so long
        # documents are tokenized in pieces), repeated until it reaches --synthetic-mb.
        corpus = "".join(Path(p).read_text() for p in plays)
        copies = max(1, round(args.synthetic_mb * 1e6 / len(corpus.encode())))
        synthetic = []
        for k in range(copies):
            path = work / "synthetic" / f"copy_{k:04d}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(corpus)
            synthetic.append(str(path))
        out = bench_prepare(synthetic, work / "synthetic_gpt2", args.workers, f"synthetic ({copies} copies)")

        bench_loader(out, args.seconds, "workers=0 prefetch=4")
        bench_loader(out, args.seconds, "workers=0 document_masking", document_masking=True)
        bench_loader(out, args.seconds, "workers=2 prefetch=4", workers=2)
        # Dealing samples to sources is O(sources) integer arithmetic per row, next to the window copy.
        mixture = {str(out): 0.7, str(work / "shakespeare"): 0.3}
        bench_loader(out, args.seconds, "workers=0 mixture of 2 (0.7/0.3)", mixture=mixture)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
