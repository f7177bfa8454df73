"""How long a checkpoint save blocks the training loop, for the GPT-2 124M train state.

    python benchmarks/bench_checkpoint.py            # ~1 min on a 2-core CPU, ~1.5 GB written per save
    python benchmarks/bench_checkpoint.py --saves 2  # quicker

Builds the gpt2-124m train state (params + AdamW moments: 373M float32, 1.49 GB; noised, since
the zero moments of a fresh state would compress away) on one CPU device, then times
``Checkpointer.save`` until it returns (what the training loop waits for with
checkpoint.async_save=true) and until the checkpoint is complete on disk (written, CRC32s
computed, renamed into place), and the same with async_save=false. The first save of each mode
is a warm-up (orbax builds its writers) and is reported separately.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, sharding
from jaxlm.config import CheckpointConfig, Config, MeshConfig, TrainConfig, preset, to_dict
from jaxlm.state import create_state, state_shardings


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(state, config: dict, directory: Path, async_save: bool, saves: int) -> dict:
    ckpt = checkpoint.Checkpointer(directory, CheckpointConfig(keep=1, async_save=async_save), say=print)
    blocked, total = [], []
    for step in range(1, saves + 2):
        t0 = time.perf_counter()
        assert ckpt.save(step, state, config)
        t1 = time.perf_counter()
        assert ckpt.wait()
        t2 = time.perf_counter()
        blocked.append(t1 - t0)
        total.append(t2 - t0)
    ckpt.close()
    size = dir_bytes(directory / str(saves + 1))
    shutil.rmtree(directory)
    return {
        "async_save": async_save,
        "warmup_blocked_s": blocked[0],
        "warmup_total_s": total[0],
        "blocked_s": float(np.median(blocked[1:])),
        "total_s": float(np.median(total[1:])),
        "gb": size / 1e9,
    }


def noisy(state):
    """Every float leaf plus small noise, as after some training."""
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return treedef.unflatten(
        [
            x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            for x, k in zip(leaves, keys, strict=True)
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=3, help="timed saves per mode (after one warm-up)")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    args = p.parse_args()

    cfg = Config(
        name="bench-checkpoint",
        model=preset("gpt2-124m"),
        train=TrainConfig(steps=1000),
        mesh=MeshConfig(data=1),
    )
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    jax.set_mesh(mesh)
    t0 = time.perf_counter()
    state = create_state(cfg, state_shardings(cfg, mesh)).as_tree()
    state = jax.jit(noisy, donate_argnums=0)(state)  # zero Adam moments would compress to nothing
    jax.block_until_ready(state)
    n = sum(x.size for x in jax.tree.leaves(state))
    print(f"gpt2-124m train state: {n / 1e6:.1f}M values, built in {time.perf_counter() - t0:.1f} s")
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {jax.device_count()} {jax.default_backend()} device(s)")

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        for async_save in (True, False):
            r = bench(state, to_dict(cfg), root / f"async_{async_save}", async_save, args.saves)
            print(
                f"async_save={str(async_save).lower():5s} | {r['gb']:.2f} GB | loop blocked "
                f"{r['blocked_s']:.2f} s | complete on disk {r['total_s']:.2f} s | "
                f"first save: blocked {r['warmup_blocked_s']:.2f} s, complete {r['warmup_total_s']:.2f} s"
            )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
