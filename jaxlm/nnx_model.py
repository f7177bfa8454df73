"""Bring your own Flax NNX model: ``model.module="FILE.py:Class"`` or ``"package.module:Class"``.

``build(cfg)`` turns a ``flax.nnx.Module`` into an ``lm.LM``, so the trainer, evaluation, sampling
and the benchmark run it exactly as they run jaxlm's own transformer. The contract (docs/nnx.md):

- constructor ``Class(cfg: ModelConfig, *, rngs: nnx.Rngs)``; call
  ``module(tokens_BxT, *, positions, segment_ids) -> logits [B, T, V']`` with V' >= model.vocab_size
  (columns past vocab_size, e.g. vocabulary padding, are dropped). ``segment_ids`` is None or
  [B, T] document ids (0 is padding): attention must stay inside a document.
- every parameter is an ``nnx.Param`` whose metadata names one logical axis of
  jaxlm/sharding.py's RULES (or None: replicated) per dimension, as ``out_sharding``
  (``nnx.with_partitioning(init, ("embed", "mlp"))``, ``kernel_metadata={"out_sharding": ...}``,
  ``nnx.Param(x, out_sharding=...)``). jaxlm derives every sharding from these names itself, so modules
  are built with NNX's eager sharding off.
- AdamW decays matrices: parameters with two or more dimensions besides a ``layers`` axis, except
  those named ``bias`` or ``scale`` (Flax's biases and norm scales, e.g. an nnx.Einsum bias
  [heads, head_dim]). A parameter's metadata ``decay=True`` or ``decay=False`` overrides the rule
  (``nnx.Param(x, decay=False)``, ``nnx.with_metadata(init, decay=False)``,
  ``kernel_metadata={"decay": False}``).
- parameter counts: rows past model.vocab_size along a ``vocab`` axis are padding and not counted.
  The 6N FLOP rule's N is every counted parameter except lookup tables, the parameters of two or
  more dimensions whose first axis is ``vocab`` or ``positions``; a module that reuses its
  embedding as the output projection says so with the class attribute ``tied_output = True``,
  which counts its ``vocab`` tables back.

Only ``nnx.Param`` variables are state: a module that keeps other variables (batch statistics,
caches, the rngs of dropout) or plain arrays is refused. There is no key/value cache: sampling runs
a full forward per new token.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxlm import lm, model, sharding
from jaxlm.config import ConfigError, ModelConfig

NO_DECAY_NAMES = ("bias", "scale")
"""Flax's names for biases and norm scales: not decayed unless their metadata says decay=True."""


def _where(e: BaseException, source: str | None = None) -> str:
    """' (at FILE:LINE)' of the innermost frame in ``source`` (else the innermost of all)."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if source and Path(f.filename) == Path(source)]
    frame = (mine or frames or [None])[-1]
    return f" (at {frame.filename}:{frame.lineno})" if frame else ""


def load_class(spec: str) -> type[nnx.Module]:
    """The class ``spec`` ('FILE.py:Class' or 'package.module:Class') names, checked to be an nnx.Module."""
    key = f"model.module={spec!r}"
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ConfigError(f"{key}: must look like 'FILE.py:Class' or 'package.module:Class'")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(
                f"{key}: file {where!r} does not exist (a relative path is taken from the working "
                f"directory {Path.cwd()}); fix the path or give an absolute one"
            )
        mod_name = f"jaxlm_module_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module  # dataclasses and pickling look their module up here
        try:
            spec_.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise ConfigError(
                f"{key}: importing {where} failed: {type(e).__name__}: {e}{_where(e, str(path))}"
            ) from None
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name and (where == e.name or where.startswith(e.name + ".")):
                raise ConfigError(
                    f"{key}: no module {where!r} on the Python path; install it, or name a file as "
                    "'FILE.py:Class'"
                ) from None
            raise ConfigError(f"{key}: importing {where} failed: {type(e).__name__}: {e}") from None
        except Exception as e:
            raise ConfigError(
                f"{key}: importing {where} failed: {type(e).__name__}: {e}{_where(e)}"
            ) from None
    cls = getattr(module, name, None)
    if cls is None:
        found = sorted(
            n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nnx.Module)
        )
        raise ConfigError(f"{key}: {where} has no class {name!r}; its nnx.Module classes: {found}")
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise ConfigError(
            f"{key}: {name} ({type(cls).__name__}) is not a flax.nnx.Module subclass; name the "
            "module's class (class Name(nnx.Module))"
        )
    return cls


def _weight(key: str, path: str, var: nnx.Variable) -> model.Weight:
    """The declaration of one parameter from its abstract value and metadata."""
    value, meta = var.get_value(), var.get_metadata()
    shape = tuple(value.shape)
    axes = tuple(meta.get("out_sharding") or ())
    known = f"known axes: {sorted(sharding.RULES)}"
    if len(axes) != len(shape):
        raise ConfigError(
            f"{key}: parameter {path} has shape {shape} but {len(axes)} logical axes {axes}; "
            "give exactly one name (or None) per dimension"
        )
    for axis in axes:
        if axis is not None and (not isinstance(axis, str) or axis not in sharding.RULES):
            raise ConfigError(
                f"{key}: parameter {path} {axes}: {axis!r} is not a jaxlm logical axis; {known}"
            )
    # A matrix decays; a vector does not, nor does it become a matrix by being stacked over layers
    # (nnx.vmap) or a Flax bias/scale shaped [heads, head_dim] (the built-in model says the same).
    matrix = sum(axis != "layers" for axis in axes) >= 2 and path.rsplit(".", 1)[-1] not in NO_DECAY_NAMES
    decay = meta.get("decay", matrix)
    if not isinstance(decay, bool):
        raise ConfigError(f"{key}: parameter {path}: decay={decay!r} must be True or False")
    # The module initialises its own parameters; "module" says the declaration's init is not used.
    return model.Weight(shape, axes, decay, init="module", dtype=jnp.dtype(value.dtype).name)


def _refuse_other_state(key: str, module: nnx.Module) -> None:
    """Only nnx.Param variables are state jaxlm keeps; anything else would be lost between steps.
    (Walks the graph: a plain array built under a trace is left out of NNX's split state.)"""
    for path, value in nnx.iter_graph(module):
        if isinstance(value, nnx.Variable) and not isinstance(value, nnx.Param):
            kind = f"an {type(value).__name__}"
        elif isinstance(value, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
            kind = "a plain array"
        else:
            continue
        raise ConfigError(
            f"{key}: {'.'.join(map(str, path))} is {kind}, not an nnx.Param; jaxlm trains nnx.Param "
            "variables only (no batch statistics, caches, plain arrays or rngs kept on the module, "
            "e.g. by nnx.Dropout); compute constants in __call__"
        )


def _unannotated(var: nnx.Variable) -> bool:
    """No logical axes, where a scalar needs none."""
    return var.get_metadata().get("out_sharding") is None and len(var.get_value().shape) > 0


def _counted(w: model.Weight, vocab_size: int) -> int:
    """Parameters of ``w`` as published: rows past vocab_size along a vocab axis are padding."""
    dims = [min(n, vocab_size) if axis == "vocab" else n for n, axis in zip(w.shape, w.axes, strict=True)]
    return math.prod(dims)


def build(cfg: ModelConfig) -> lm.LM:
    """The ``lm.LM`` of the nnx.Module that ``cfg.module`` names, configured by ``cfg``."""
    cls = load_class(cfg.module)
    key = f"model.module={cfg.module!r}"
    source = getattr(sys.modules.get(cls.__module__), "__file__", None)

    def make(rng) -> nnx.Module:
        # jaxlm derives shardings from the axis names itself; eager sharding would need the names
        # to be mesh axes.
        with nnx.use_eager_sharding(False):
            return cls(cfg, rngs=nnx.Rngs(rng))

    box = {}

    def abstract_params() -> nnx.State:
        module = make(0)
        _refuse_other_state(key, module)
        graphdef, params, _ = nnx.split(module, nnx.Param, ...)
        box["graphdef"] = graphdef  # static: no arrays, safe to keep from inside the trace
        return params

    # jax.eval_shape, not nnx.eval_shape: that one attaches NamedShardings from the axis names to
    # the abstract values whenever a mesh is set, and the names are logical, not mesh axes.
    try:
        param_state = jax.eval_shape(abstract_params)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{key}: {cls.__name__}(cfg, rngs=nnx.Rngs(key)) failed: {type(e).__name__}: {e}"
            f"{_where(e, source)}"
        ) from None
    graphdef = box["graphdef"]
    flat = nnx.to_flat_state(param_state)
    if not flat:
        raise ConfigError(f"{key}: {cls.__name__} has no nnx.Param; nothing to train")
    # Params are a plain dict with string keys (an nnx.List's 0, 1, ... become "0", "1", ...), so
    # checkpoints and paths treat them like the built-in model's; the module's own keys come back
    # for nnx.merge.
    module_path = {tuple(map(str, path)): tuple(path) for path, _ in flat}
    named = {".".join(map(str, path)): var for path, var in flat}
    bare = [f"{name} {var.get_value().shape}" for name, var in named.items() if _unannotated(var)]
    if bare:
        raise ConfigError(
            f"{key}: parameter{'s' if len(bare) > 1 else ''} {', '.join(bare[:8])}"
            f"{f' and {len(bare) - 8} more' if len(bare) > 8 else ''} without logical axes; annotate "
            "each with one name per dimension, e.g. nnx.with_partitioning(init, ('embed', 'mlp')) or "
            f"kernel_metadata={{'out_sharding': ('embed', 'mlp')}}; known axes: {sorted(sharding.RULES)}"
        )
    decls = traverse_util.unflatten_dict(
        {tuple(map(str, path)): _weight(key, ".".join(map(str, path)), var) for path, var in flat}
    )

    def pure(state: nnx.State) -> lm.Params:
        return traverse_util.unflatten_dict(
            {tuple(map(str, p)): v for p, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()}
        )

    def init(rng: jax.Array) -> lm.Params:
        return pure(nnx.state(make(rng), nnx.Param))

    def forward(params, tokens_BxT, positions_BxT, segment_ids_BxT):
        state = traverse_util.unflatten_dict(
            {module_path[p]: v for p, v in traverse_util.flatten_dict(params).items()}
        )
        module = nnx.merge(graphdef, nnx.State(state))
        return module(tokens_BxT, positions=positions_BxT, segment_ids=segment_ids_BxT)

    def logits(params, tokens_BxT, positions_BxT, segment_ids_BxT):
        out_BxTxV = forward(params, tokens_BxT, positions_BxT, segment_ids_BxT)
        return out_BxTxV[..., : cfg.vocab_size].astype(jnp.float32)

    def loss_sums(params, batch, document_masking):
        segment_ids = batch["segment_ids"] if document_masking else None
        logits_BxTxV = logits(params, batch["inputs"], batch["positions"], segment_ids)
        return lm.masked_xent_sums(logits_BxTxV, batch["targets"], batch["loss_mask"])

    _check_call(key, cls.__name__, source, forward, decls, cfg)
    weights = jax.tree.leaves(decls, is_leaf=model.is_weight)
    count = sum(_counted(w, cfg.vocab_size) for w in weights)
    # lookup tables, outside the 6N of FLOPs: a vocab or positions table [V or P, ...]
    tables = [w for w in weights if len(w.axes) >= 2 and w.axes[0] in model.TABLE_AXES]
    tied = [w for w in tables if w.axes[0] == "vocab"] if getattr(cls, "tied_output", False) else []
    return lm.LM(
        cfg=cfg,
        name=cfg.module,
        decls=decls,
        init=init,
        loss_sums=loss_sums,
        logits=logits,
        kv_cache=False,
        count=count,
        flop_params=count
        - sum(_counted(w, cfg.vocab_size) for w in tables)
        + sum(_counted(w, cfg.vocab_size) for w in tied),
    )


def _check_call(key: str, name: str, source: str | None, forward, decls, cfg: ModelConfig) -> None:
    """Trace one forward (shapes only, nothing runs) so a wrong call signature or output shape is
    one clear error now instead of a traceback from inside the first compiled step. Traced
    without segment ids: whether documents are masked is the data's setting, and an attention
    backend may honour them only on some devices."""
    params = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype), decls, is_leaf=model.is_weight)
    tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
    try:
        out = jax.eval_shape(lambda p, t: forward(p, t, t, None), params, tokens)
    except ConfigError:
        raise  # already says what to change (e.g. jaxlm.attention refusing a backend)
    except Exception as e:
        raise ConfigError(
            f"{key}: {name}(tokens_BxT, positions=positions_BxT, segment_ids=None) failed: "
            f"{type(e).__name__}: {e}{_where(e, source)}"
        ) from None
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 3 or shape[:2] != (1, cfg.seq_len) or shape[2] < cfg.vocab_size:
        got = f"shape {tuple(shape)}" if shape is not None else type(out).__name__
        raise ConfigError(
            f"{key}: {name} returned {got} for tokens of shape (1, {cfg.seq_len}); it must "
            f"return one array of logits [B, T, V] with V >= model.vocab_size={cfg.vocab_size}"
        )
