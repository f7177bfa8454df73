"""Llama-3.2-1B shape (RoPE, RMSNorm, SwiGLU, GQA 32/8): the multi-GPU scale-out reference.

Run:      jaxlm train experiments/llama_1b.py --set mesh.fsdp=-1 mesh.data=1
Expect:   needs accelerators; FSDP shards params and optimizer state across all devices.
"""

from jaxlm.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig, preset


def get_config() -> Config:
    model: ModelConfig = preset("llama-1b", remat="save_matmuls")
    return Config(
        name="llama-1b",
        model=model,
        data=DataConfig(inputs=("shakespeare",), dir="data_cache/shakespeare-gpt2", tokenizer="gpt2"),
        optim=OptimConfig(lr=3e-4, warmup_steps=500, weight_decay=0.1),
        train=TrainConfig(steps=10000, batch_size=64, micro_batches=4, eval_every=1000),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    )
