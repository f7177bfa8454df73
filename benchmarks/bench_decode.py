"""Decode throughput of the KV-cached sampler: new tokens per second after compilation.

    python benchmarks/bench_decode.py                       # GPT-2 124M, batch 1 and 8, 128 new tokens
    python benchmarks/bench_decode.py --preset tiny --new-tokens 32   # quick look
    python benchmarks/bench_decode.py --batch 1 64 --json decode.json  # also the figures as JSON

Random-init weights (speed does not depend on them); random prompts of --prompt-len tokens; no
end-of-document token, so every row decodes all new tokens. Each configuration is compiled and
run once untimed, then timed over --repeats runs of the whole ``sampling.generate`` call (prefill
included, host transfer included); the best run is reported with the median beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from jaxlm import model, sampling
from jaxlm.config import preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON here")
    args = p.parse_args()

    cfg = preset(args.preset)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"decode {args.preset} ({model.count_params(cfg) / 1e6:.0f}M params, "
        f"{model.compute_dtype(cfg).name}) on {jax.device_count()} {jax.default_backend()} device(s) "
        f"[{jax.devices()[0].device_kind}], {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, load avg {load:.1f} | prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}"
    )
    result = {
        "preset": args.preset,
        "params": model.count_params(cfg),
        "compute_dtype": model.compute_dtype(cfg).name,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
        "repeats": args.repeats,
        "rows": [],
    }
    rng = np.random.default_rng(0)
    for B in args.batch:
        prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).tolist()

        def run(seed: int, prompts=prompts) -> list[list[int]]:
            return sampling.generate(
                params, cfg, prompts, args.new_tokens, args.temperature, args.top_k, args.top_p, seed
            )

        t0 = time.perf_counter()
        out = run(0)  # compile + first run
        first = time.perf_counter() - t0
        assert all(len(r) == args.new_tokens for r in out)
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            run(i + 1)
            times.append(time.perf_counter() - t0)
        best, med = min(times), float(np.median(times))
        n = B * args.new_tokens
        print(
            f"batch {B:3d}: {n / best:8.1f} new tokens/s (median {n / med:.1f}) | "
            f"{best / args.new_tokens * 1e3:7.1f} ms per step | first call with compile {first:.1f}s"
        )
        result["rows"].append(
            {
                "batch": B,
                "new_tokens_per_s": n / best,
                "median_new_tokens_per_s": n / med,
                "ms_per_step": best / args.new_tokens * 1e3,
                "first_call_s": first,
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
