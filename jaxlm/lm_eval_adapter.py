"""A jaxlm checkpoint as an lm-evaluation-harness model (``pip install -e '.[eval]'``), so that
harness tasks run against it: ``jaxlm lm-eval --checkpoint RUN --tasks NAME --include-path DIR``,
or from Python ``lm_eval.simple_evaluate(model="jaxlm", model_args="checkpoint=RUN", ...)`` once
this module is imported (it registers the name "jaxlm").

The three request kinds reuse jaxlm's own code: ``loglikelihood`` and ``loglikelihood_rolling``
score (context, continuation) token pairs with ``tasks.score`` (the scorer of jaxlm's task evals,
so a harness multiple-choice task and the same JSONL under ``jaxlm eval --task`` give the same
log-likelihoods), and ``generate_until`` decodes with ``sampling.generate`` (the KV-cache decode
of ``jaxlm sample``). Nothing is fetched from a hub: ``jaxlm lm-eval`` sets HF_DATASETS_OFFLINE=1
and HF_HUB_OFFLINE=1 unless the environment sets them already, so tasks read local files
(``dataset_path: json`` with ``data_files``). docs/evals.md has an example task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxlm import lm, sampling, tasks
from jaxlm.checkpoint import load_params
from jaxlm.config import ConfigError
from jaxlm.data.tokenizer import get_tokenizer
from jaxlm.evaluate import check_batch_size


@register_model("jaxlm")
class JaxLM(LM):
    """``checkpoint``: a run directory (latest step) or one step directory. ``batch_size``: rows
    per scoring batch (default: the run's per-micro-batch batch size); generation batches as many
    prompts. ``max_gen_toks``: new tokens when a task sets none (lm-eval's default, 256)."""

    def __init__(self, checkpoint: str, batch_size=None, max_gen_toks: int = 256, **_harness_args):
        super().__init__()
        self.cfg, self.params, self.step, self.mesh = load_params(checkpoint)
        run_rows = self.cfg.train.batch_size // self.cfg.train.micro_batches
        self.rows = int(batch_size) if str(batch_size or "").isdigit() else run_rows
        check_batch_size(self.rows, self.mesh)
        self.tok = get_tokenizer(self.cfg.data.tokenizer)
        self.max_gen_toks = int(max_gen_toks)

    def _score(self, pairs: list[tasks.Pair]) -> tuple[np.ndarray, np.ndarray]:
        with jax.set_mesh(self.mesh):
            return tasks.score(self.params, self.cfg.model, pairs, self.rows)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tasks.encode_pair(self.tok, ctx, cont) for ctx, cont in (r.args for r in requests)]
        for (ctx, cont), (_, ids) in zip((r.args for r in requests), pairs, strict=True):
            if not 1 <= len(ids) <= self.cfg.model.seq_len:
                raise ConfigError(
                    f"continuation {cont[:40]!r} is {len(ids)} tokens; it must be 1 to model.seq_len="
                    f"{self.cfg.model.seq_len} (after context {ctx[-40:]!r})"
                )
        logp, greedy = self._score(pairs)
        return [(float(lp), bool(g)) for lp, g in zip(logp, greedy, strict=True)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text's log-likelihood after the end-of-document token, in windows of the model's
        length that predict every token once (lm-eval's rolling windows, context_len=1)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(
                self.tok.encode(text), self.tok.eot_id, self.cfg.model.seq_len, context_len=1
            )
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((list(ctx), list(cont)))
                owner.append(i)
        logp, _ = self._score(pairs)
        return np.bincount(np.asarray(owner, int), logp, minlength=len(requests)).tolist()

    def generate_until(self, requests) -> list[str]:
        """Greedy decoding (or sampling when a task sets do_sample with a temperature) up to
        ``max_gen_toks`` new tokens, cut before the first of the task's ``until`` strings."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests of the same generation settings decode together
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            new, prompts = self._fit(
                [requests[i].args[0] for i in idx], int(kw.get("max_gen_toks", self.max_gen_toks))
            )
            for start in range(0, len(idx), self.rows):
                with jax.set_mesh(self.mesh):
                    ids = sampling.generate(
                        self.params, self.cfg.model, prompts[start : start + self.rows], new, temperature,
                        eot_id=self.tok.eot_id, seed=int(kw.get("seed", 0)),
                    )  # fmt: skip
                for i, row in zip(idx[start : start + self.rows], ids, strict=True):
                    text = self.tok.decode(row)
                    cuts = [text.index(s) for s in until if s and s in text]
                    out[i] = text[: min(cuts)] if cuts else text
        return out

    def _fit(self, contexts: list[str], max_new: int) -> tuple[int, list[list[int]]]:
        """(new tokens, prompts cut on the left) so prompt and generation fit the window where the
        model needs them to (learned positions, or no KV cache): at most half of it generates."""
        cfg = self.cfg.model
        prompts = [self.tok.encode(c) or [self.tok.eot_id] for c in contexts]
        windowed = cfg.positions == "learned" or not lm.get(cfg).kv_cache
        new = min(max_new, cfg.seq_len // 2) if windowed else max_new
        keep = cfg.seq_len - new + 1 if windowed else cfg.seq_len
        return new, [p[-keep:] for p in prompts]


# --------------------------------------------------------------------------------------------
# ``jaxlm lm-eval``: the harness's simple_evaluate on a checkpoint.
# --------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    for d in args.include_path or []:
        if not Path(d).is_dir():
            raise ConfigError(f"--include-path {d!r} is not a directory of lm-eval task YAML files")
    # The harness's own task index (thousands of YAML files, a minute to read) only without
    # --include-path: its tasks need hub datasets, which an offline run finds only when cached.
    manager = TaskManager(include_path=args.include_path or None, include_defaults=not args.include_path)
    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks: lm-eval knows no task {unknown[0]!r}; define it in a YAML file under --include-path "
            "(docs/evals.md has an example)"
        )
    model = JaxLM(args.checkpoint, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(
        model=model, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager,
        log_samples=args.output is not None, bootstrap_iters=0,
    )  # fmt: skip
    print(f"step {model.step} of {args.checkpoint}")
    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, default=handle_non_serializable, indent=1))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
