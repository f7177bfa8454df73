"""Hugging Face ``transformers`` interop: export a checkpoint, import a model.

``jaxlm export`` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained``
loads as ``GPT2LMHeadModel`` (learned positions, LayerNorm, GELU-tanh MLP, biases) or
``LlamaForCausalLM`` (rope, RMSNorm, SwiGLU, GQA); ``jaxlm import`` turns such a directory back
into a jaxlm checkpoint that ``jaxlm train --resume`` continues. A model with an option neither
architecture has is refused, naming the option. Neither direction needs torch, transformers or
the safetensors package.

One file a job:

- ``arch.py``: which transformers architecture represents a model, and its tensor table: every
  Hugging Face tensor, the jaxlm params it is made of, and the conversion both ways, checked
  against ``model.param_decls``.
- ``config_json.py``: transformers' ``config.json`` from a jaxlm config, and back.
- ``safetensors.py``: the safetensors format (one file or an index of shards), written and read.
- ``export.py``: ``jaxlm export``: params (possibly sharded) -> a transformers model directory.
- ``importer.py``: ``jaxlm import``: a transformers directory -> a jaxlm run with a step-0 checkpoint.
"""
