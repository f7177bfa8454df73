"""Per-device memory of one training step's loss and gradients against the context size, from XLA's
memory analysis of the compiled program (nothing is run): one row of --seq-len tokens on C devices,
mesh context=C, packed documents on.

    python benchmarks/bench_context_memory.py                        # seq 2048, the test's tiny model
    python benchmarks/bench_context_memory.py --seq-len 8192 --d-model 128 --n-heads 4 --n-layers 2

Runs on 8 fake CPU devices (it sets XLA_FLAGS itself). "temp" is XLA's scratch per device: the
activations, the scores of the attention blocks, and the gradients before they leave the program;
"args" the params and the batch shard per device.
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlm import model, sharding  # noqa: E402
from jaxlm.config import MeshConfig, preset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=16)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4, 8])
    a = p.parse_args()
    cfg = preset("tiny", vocab_size=64, seq_len=a.seq_len, n_layers=a.n_layers, d_model=a.d_model,
                 n_heads=a.n_heads, n_kv_heads=1, d_ff=2 * a.d_model)  # fmt: skip
    T = a.seq_len
    batch = {k: jnp.zeros((1, T), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}  # fmt: skip
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))

    def loss_and_grads(p, b):
        return jax.value_and_grad(lambda p: (s := model.loss_sums(p, b, cfg, True)).xent / s.count)(p)

    print(f"seq {T}, d_model {a.d_model}, {a.n_heads} heads, {a.n_layers} layer(s), one row; per device:")
    print("| context | temp MiB | args MiB | temp vs context 1 |")
    print("| --- | --- | --- | --- |")
    first = None
    for C in a.contexts:
        mesh = sharding.make_mesh(MeshConfig(data=1, context=C), jax.devices()[:C])
        with jax.set_mesh(mesh):
            f = jax.jit(loss_and_grads, in_shardings=(None, sharding.batch_sharding(mesh)))
            m = f.lower(params, batch).compile().memory_analysis()
        first = first or m.temp_size_in_bytes
        print(f"| {C} | {m.temp_size_in_bytes / 2**20:.2f} | {m.argument_size_in_bytes / 2**20:.3f} "
              f"| {m.temp_size_in_bytes / first:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
