"""bfloat16 against float32 matmul speed on this machine: what compute_dtype=auto decides on a CPU.

    PYTHONPATH=. python benchmarks/bench_matmul_dtype.py              # jitted 2048^3, median of 10
    PYTHONPATH=. python benchmarks/bench_matmul_dtype.py --size 1024  # the size auto measures

Needs only jax (no flax, optax, grain), so any Python/jax pair can be compared. The timing is
jaxlm/cpu_dtype.py's measurement (compiled and warmed up, the dtypes alternating), so the figures
are those the decision rule sees, at a larger size; the decision printed is the rule's on them.
"""

from __future__ import annotations

import argparse
import platform
import sys

import jax

from jaxlm import cpu_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    seconds = cpu_dtype.measure(args.size, args.repeats)
    flop = 2 * args.size**3
    tflops = {name: flop / seconds[f"{name}_s"] / 1e12 for name in ("bfloat16", "float32")}
    print(f"machine   {cpu_dtype.machine_key()}")
    print(f"python    {sys.version.split()[0]} on {platform.machine()}, backend {jax.default_backend()}")
    ratio = tflops["bfloat16"] / tflops["float32"]
    print(
        f"matmul    {args.size}^3 jitted, median of {args.repeats}: bfloat16 {tflops['bfloat16']:.3f} "
        f"TFLOP/s, float32 {tflops['float32']:.3f} TFLOP/s (bf16/f32 {ratio:.2f}x)"
    )
    choice = cpu_dtype.decide(seconds["float32_s"], seconds["bfloat16_s"])
    print(f"auto      {choice} (bfloat16 needs >= {cpu_dtype.MARGIN}x)")


if __name__ == "__main__":
    main()
