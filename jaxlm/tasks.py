"""Downstream task evals: multiple-choice and cloze tasks from local JSONL, scored by log-likelihood.

A task file holds one example a line, ``{"context": str, "choices": [str, ...], "label": int}``
(HellaSwag's layout with plain names). Each choice is scored as a continuation of the context:
the sum of log p(choice tokens | context tokens). ``acc`` counts the examples whose label has the
largest sum; ``acc_norm`` divides each sum by the choice's length in characters first, as
lm-eval's acc_norm does, so a long choice is not penalised for its many tokens and the figure
does not depend on the tokenizer. A line with a single choice is a cloze: it counts as correct
when greedy decoding would produce the whole choice (LAMBADA's accuracy).

(context, choice) pairs are scored one per row of fixed-shape [rows, seq_len] batches sharded like
the trainer's eval batches, so the scoring step compiles once and sums the same tokens on any mesh;
a context longer than the window is cut on the left. The same scorer serves ``train.eval_tasks``,
``jaxlm eval --task`` and the lm-eval adapter (jaxlm/lm_eval_adapter.py). docs/evals.md has the details.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import lm, model, sharding
from jaxlm.config import ModelConfig
from jaxlm.data.prepare import DataError
from jaxlm.evaluate import check_batch_size

Pair = tuple[list[int], list[int]]
"""(context token ids, continuation token ids)."""


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int
    line: int = 0
    """Where it is in its file, for errors."""


@dataclass(frozen=True)
class Task:
    name: str
    """The file's stem: ``experiments/tasks/shakespeare_next_line.jsonl`` logs as
    ``tasks/shakespeare_next_line/acc``."""
    path: str
    examples: tuple[Example, ...]


# --------------------------------------------------------------------------------------------
# Reading a task file: every bad line is one error naming the file and the line.
# --------------------------------------------------------------------------------------------


def read_task(path: str | Path) -> Task:
    """The examples of the JSONL task file at ``path``; a bad line raises ``DataError`` naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"task file {str(path)!r} does not exist; give a JSONL file with one "
            '{"context": ..., "choices": [...], "label": ...} a line'
        )
    examples = []
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                examples.append(_example(line, f"{path}:{line_no}", line_no))
    if not examples:
        raise DataError(f"task file {str(path)!r} holds no examples; it needs one JSON object a line")
    return Task(name=p.stem, path=str(path), examples=tuple(examples))


def _example(line: str, where: str, line_no: int) -> Example:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: a line must be a JSON object with keys context, choices, label")
    missing = [k for k in ("context", "choices", "label") if k not in d]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r}; each line needs context, choices and label")
    context, choices, label = d["context"], d["choices"], d["label"]
    if not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be a string, not {type(context).__name__}")
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{where}: 'choices' must be a non-empty list of non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(
            f"{where}: 'label' must be the index of the right choice, an integer in [0, {len(choices)}), "
            f"not {label!r}"
        )
    return Example(context, tuple(choices), label, line_no)


# --------------------------------------------------------------------------------------------
# Tokens: a (context, continuation) pair, split as lm-eval splits it.
# --------------------------------------------------------------------------------------------


def encode_pair(tok, context: str, continuation: str) -> Pair:
    """Token ids of the context and of the continuation. The pair is encoded whole and split where
    the context's own tokens end, so a BPE merge across the boundary does not change the text,
    and trailing spaces of the context move to the continuation (as lm-eval does: " word" is one
    GPT-2 token, "word" after a context ending in a space is another). An empty context becomes the
    end-of-document token, which precedes every document the model trained on."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    ctx, cont = whole[:n_ctx], whole[n_ctx:]
    return (ctx or [tok.eot_id]), cont


# --------------------------------------------------------------------------------------------
# Scoring: one pair a row of fixed [rows, seq_len] batches, on the mesh the params live on.
# --------------------------------------------------------------------------------------------


def pack(pairs: list[Pair], rows: int, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Host batches of ``rows`` rows: row r holds pair r's tokens from position 0 (the context cut
    on the left to fit ``seq_len`` inputs) and a loss mask on its continuation's targets; the rows
    after the last pair are empty (mask 0). Padding sits after the pair, where causal attention
    keeps it from the scored positions."""
    batches = []
    for start in range(0, len(pairs), rows):
        inputs = np.zeros((rows, seq_len), np.int32)
        targets = np.zeros((rows, seq_len), np.int32)
        mask = np.zeros((rows, seq_len), np.float32)
        for r, (ctx, cont) in enumerate(pairs[start : start + rows]):
            if not 1 <= len(cont) <= seq_len:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the window of {seq_len}")
            seq = (ctx + cont)[-(seq_len + 1) :]
            n = len(seq) - 1
            inputs[r, :n], targets[r, :n] = seq[:-1], seq[1:]
            mask[r, n - len(cont) : n] = 1.0
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
        batches.append({"inputs": inputs, "targets": targets, "positions": positions, "loss_mask": mask})
    return batches


@functools.cache
def _score_step(cfg: ModelConfig, mesh: jax.sharding.Mesh):
    """Jitted (params, batch) -> (sum of log p over each row's masked targets [rows], whether every
    masked target is the argmax [rows]), replicated so every process reads all rows."""
    logits_fn = lm.get(cfg).logits

    def score(params, batch):
        logits_BxTxV = logits_fn(params, batch["inputs"], batch["positions"], None)
        xent_BxT, _ = model.token_xent_and_lse(logits_BxTxV, batch["targets"])
        mask_BxT = batch["loss_mask"]
        greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == batch["targets"]
        return -(xent_BxT * mask_BxT).sum(-1), jnp.all(greedy_BxT | (mask_BxT == 0), axis=-1)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(score, out_shardings=(replicated, replicated))


def params_mesh(params) -> jax.sharding.Mesh:
    return jax.tree.leaves(params)[0].sharding.mesh


def score(params, cfg: ModelConfig, pairs: list[Pair], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(log p(continuation | context) [N] float64, greedy [N] bool) of each pair, in ``rows``-row
    batches on the mesh ``params`` are sharded over (call it under ``jax.set_mesh`` of that mesh).
    ``rows`` must be a multiple of the mesh's batch shards (``evaluate.check_batch_size``)."""
    mesh = params_mesh(params)
    check_batch_size(rows, mesh)
    step = _score_step(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    index, count = sharding.process_batch_slice(mesh)
    local = rows // count
    logp, greedy = [], []
    for batch in pack(pairs, rows, cfg.seq_len):
        mine = {k: v[index * local : (index + 1) * local] for k, v in batch.items()}
        lp_R, g_R = step(params, sharding.global_batch(mine, batch_sh, count))
        logp.append(np.asarray(lp_R, np.float64))
        greedy.append(np.asarray(g_R))
    if not pairs:
        return np.zeros(0), np.zeros(0, bool)
    return np.concatenate(logp)[: len(pairs)], np.concatenate(greedy)[: len(pairs)]


# --------------------------------------------------------------------------------------------
# Accuracy.
# --------------------------------------------------------------------------------------------


def accuracy(
    logp: list[np.ndarray], greedy: list[np.ndarray], chars: list[np.ndarray], labels: list[int]
) -> dict[str, float]:
    """acc and acc_norm over examples, each given its choices' log-likelihoods, greedy flags and
    lengths in characters. The first of tied choices wins, as with ``np.argmax``."""
    acc = norm = 0.0
    for lp, g, n, label in zip(logp, greedy, chars, labels, strict=True):
        if len(lp) == 1:  # a cloze: right when greedy decoding gives the whole continuation
            acc += float(g[0])
            norm += float(g[0])
        else:
            acc += float(np.argmax(lp) == label)
            norm += float(np.argmax(lp / n) == label)
    return {"acc": acc / len(labels), "acc_norm": norm / len(labels)}


@dataclass(frozen=True)
class Encoded:
    """A task with its (context, choice) pairs tokenized once."""

    task: Task
    pairs: list[Pair]
    owner: list[int]
    """Example index of each pair."""


def encode_task(task: Task, tok, seq_len: int) -> Encoded:
    pairs, owner = [], []
    for i, ex in enumerate(task.examples):
        for j, choice in enumerate(ex.choices):
            ctx, cont = encode_pair(tok, ex.context, choice)
            if len(cont) > seq_len:
                raise DataError(
                    f"{task.path}:{ex.line}: choice {j} is {len(cont)} tokens, longer than the window "
                    f"model.seq_len={seq_len}; shorten it (the context may be of any length)"
                )
            pairs.append((ctx, cont))
            owner.append(i)
    return Encoded(task, pairs, owner)


def evaluate_encoded(params, cfg: ModelConfig, enc: Encoded, rows: int) -> dict[str, Any]:
    """{"acc", "acc_norm", "examples"} of one task."""
    logp_P, greedy_P = score(params, cfg, enc.pairs, rows)
    bounds = np.cumsum([0] + [len(ex.choices) for ex in enc.task.examples])
    exs = enc.task.examples
    result = accuracy(
        [logp_P[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        [greedy_P[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        [np.array([len(c) for c in ex.choices], np.float64) for ex in exs],
        [ex.label for ex in exs],
    )
    return {**result, "examples": len(exs)}


def read_tasks(paths) -> list[Task]:
    """``read_task`` of each path; two files of one name (their metrics would mix) are refused."""
    tasks = [read_task(p) for p in paths]
    names = [t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            same = [t.path for t in tasks if t.name == name]
            raise DataError(f"task files {same} share the name {name!r} their metrics log under; rename one")
    return tasks


class TaskEvals:
    """Tasks tokenized once (in the trainer, before the first step, so a bad file fails at once);
    calling it scores them all with ``params``."""

    def __init__(self, tasks: list[Task], tokenizer: str, cfg: ModelConfig, rows: int):
        from jaxlm.data.tokenizer import get_tokenizer

        tok = get_tokenizer(tokenizer) if tasks else None
        self.encoded = [encode_task(t, tok, cfg.seq_len) for t in tasks]
        self.cfg, self.rows = cfg, rows

    def __bool__(self) -> bool:
        return bool(self.encoded)

    def __call__(self, params) -> dict[str, dict[str, Any]]:
        """{task name: {"acc", "acc_norm", "examples"}}."""
        return {e.task.name: evaluate_encoded(params, self.cfg, e, self.rows) for e in self.encoded}


def evaluate_checkpoint(
    path: str | Path, task_files: list[str], batch_size: int | None = None
) -> tuple[int, dict[str, dict[str, Any]]]:
    """(step, results by task name) of the checkpoint at ``path`` on ``task_files`` (``jaxlm eval
    --task``); ``batch_size`` rows per batch, by default the run's per-micro-batch batch size."""
    from jaxlm import checkpoint

    tasks = read_tasks(task_files)  # before the checkpoint loads, so a bad file fails at once
    cfg, params, step, mesh = checkpoint.load_params(path)
    rows = batch_size or cfg.train.batch_size // cfg.train.micro_batches
    check_batch_size(rows, mesh)
    evals = TaskEvals(tasks, cfg.data.tokenizer, cfg.model, rows)
    with jax.set_mesh(mesh):
        return step, evals(params)
