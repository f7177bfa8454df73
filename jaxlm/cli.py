"""The ``jaxlm`` command: every parser, then thin dispatch to the modules that do the work.

The parsers are built here, from the standard library and ``jaxlm.config`` alone, so ``--help``
and a mistyped flag answer at once: jax, orbax and grain load only once a command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.prepare import DataError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to each option's help, except for flags and where nothing (None, an
    empty list) is the default: those helps say in words what happens without the option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.required or not action.option_strings or action.nargs == 0:
            return text
        if action.default is None or action.default is argparse.SUPPRESS or action.default == []:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line instead of argparse's usage dump
        raise ConfigError(f"{self.prog}: {message}; see '{self.prog} --help'")


def _experiment_args(p: argparse.ArgumentParser, what: str = "get_config()") -> None:
    p.add_argument("experiment", help=f"experiments/NAME.py exposing {what}")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")


# --------------------------------------------------------------------------------------------
# Commands: arguments (light) and what runs them (imports the heavy modules).
# --------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    _experiment_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="require a checkpoint to continue from (default: continue from the run's latest "
        "checkpoint when it has one, else start fresh)",
    )
    g.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="refuse to continue a run that has checkpoints",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="STEPS",
        help="trace steps with jax.profiler into <run>/profile/ for TensorBoard's profile plugin: N, the N "
        "steps after this run's first (which compiles), or A:B, steps A to B-1 (default: no trace)",
    )


def _train(args: argparse.Namespace) -> int:
    from jaxlm import profile, train
    from jaxlm.config import load_config

    cfg = load_config(args.experiment, args.set)
    span = profile.parse_steps(args.profile) if args.profile is not None else None
    try:
        train.run(cfg, resume=args.resume, profile_steps=span)
    except FloatingPointError as e:  # the loss diverged: the message says what was kept and what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    default = DataConfig()
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH_OR_GLOB",
        help="text/JSONL/Parquet files or quoted globs; 'shakespeare' is the embedded corpus",
    )
    p.add_argument("--tokenizer", default=default.tokenizer, help="gpt2 | bytes | BPE directory")
    p.add_argument("--out", required=True, help="output directory (data.dir)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=default.val_fraction,
        help="fraction of documents held out for validation",
    )
    p.add_argument(
        "--max-undecodable",
        type=float,
        default=default.max_undecodable,
        help="refuse an input file with more than this fraction of its bytes not UTF-8 "
        "(data.max_undecodable)",
    )
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument(
        "--seed",
        type=int,
        default=default.split_seed,
        help="seed of the train/val document split (data.split_seed)",
    )


def _prepare(args: argparse.Namespace) -> int:
    from jaxlm.data.prepare import prepare

    try:
        prepare(
            args.input, args.tokenizer, args.out, args.val_fraction, seed=args.seed, workers=args.workers,
            max_undecodable=args.max_undecodable,
        )  # fmt: skip
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    _experiment_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument(
        "--matmul-n", type=int, default=None, help="size of the peak matmul (default: 2048 on CPU, else 8192)"
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the figures as JSON here (default: not written)",
    )
    p.add_argument(
        "--attention-parity",
        action="store_true",
        help="instead of the step: check every attention backend on this device against the reference "
        "at the experiment's shapes and dtype (exit 1 if one disagrees)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after the timed steps, trace 3 more with jax.profiler into DIR and print the 15 ops that "
        "took the most time (default: no trace)",
    )
    p.add_argument(
        "--skip-ceiling",
        action="store_true",
        help="do not time the step's matmul shapes alone ('matmuls alone'): quicker, e.g. for a sweep",
    )


def _bench(args: argparse.Namespace) -> int:
    from jaxlm.bench import bench_main

    return bench_main(args)


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir (latest step) or one step dir")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per non-empty line (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the nucleus of this mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")


def _sample(args: argparse.Namespace) -> int:
    from jaxlm import sampling

    prompts = sampling.read_prompts(args.prompt, args.prompts_file)
    try:
        out = sampling.sample_checkpoint(
            args.checkpoint, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            args.seed, args.num_samples,
        )  # fmt: skip
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, samples in zip(prompts, out["completions"], strict=True):
        for text in samples:
            print(prompt + text, end="\n---------------\n", flush=True)
    print(
        f"step {out['step']}: {out['new_tokens']} new tokens in {out['seconds']:.1f}s "
        f"({out['new_tokens'] / out['seconds']:.0f} tokens/s, compilation included)",
        file=sys.stderr,
    )
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir (latest step) or one step dir")
    p.add_argument("--data", help="prepared data dir (default: the run's data.dir)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which split to evaluate")
    p.add_argument("--batches", type=int, help="batches to evaluate (default: train.eval_batches; 0: all)")
    p.add_argument("--batch-size", type=int, help="global batch (default: the run's)")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="FILE",
        help="instead of the loss: accuracy on this JSONL task of context, choices, label "
        "(repeatable; docs/evals.md), e.g. experiments/tasks/shakespeare_next_line.jsonl",
    )


def _eval(args: argparse.Namespace) -> int:
    from jaxlm.evaluate import evaluate_checkpoint

    if args.task:
        return _eval_tasks(args)
    try:
        r = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batches, args.batch_size)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"step {r['step']} | {r['split']} split of {r['data']} | {r['batches'] or 'all'} batches of "
        f"{r['batch_size']} | loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f}"
    )
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    from jaxlm import tasks

    try:
        step, results = tasks.evaluate_checkpoint(args.checkpoint, args.task, args.batch_size)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in results.items():
        print(
            f"step {step} | task {name} | {r['examples']} examples | acc {r['acc']:.4f} | "
            f"acc_norm {r['acc_norm']:.4f}"
        )
    return 0


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir (latest step) or one step dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument(
        "--include-path",
        action="append",
        metavar="DIR",
        help="directory of lm-eval task YAML files (repeatable); given, only these tasks are known "
        "(default: the harness's own tasks, whose datasets must be in the local Hugging Face cache)",
    )
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=float, help="examples per task, or a fraction of them (default: all)")
    p.add_argument("--batch-size", type=int, help="rows per scoring batch (default: the run's)")
    p.add_argument(
        "--output", metavar="PATH", help="write the results and samples as JSON here (default: not)"
    )


def _lm_eval(args: argparse.Namespace) -> int:
    import os

    # Before the harness imports datasets, which reads these once: nothing comes from a hub
    # unless the user's environment asks for it.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from jaxlm import lm_eval_adapter
    except ImportError as e:
        print(
            f"error: jaxlm lm-eval needs lm-evaluation-harness ({e}); pip install -e '.[eval]'",
            file=sys.stderr,
        )
        return 2
    try:
        return lm_eval_adapter.main(args)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiments/NAME.py exposing get_config() and get_sweep()")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their overrides; run nothing")
    p.add_argument("--executor", choices=("local", "slurm"), default="local", help="where the runs train")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (local: on disjoint devices)")
    p.add_argument(
        "--run-index",
        type=int,
        default=None,
        help="train only run i here (SLURM array tasks; default: all runs)",
    )
    p.add_argument(
        "--sbatch",
        default="",
        metavar="OPTIONS",
        help="with --executor slurm: sbatch options over launch/slurm.sbatch's #SBATCH lines, as one "
        "string, e.g. --sbatch='--nodes=1 --time=2:00:00' (default: the script's)",
    )


def _sweep(args: argparse.Namespace) -> int:
    from jaxlm.sweep import main as sweep_main

    return sweep_main(args)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", help="runs/<sweep> (or a single run directory)")
    p.add_argument(
        "--out", default=None, help="where the report's CSV/PNG/JSON files go (default: sweep_dir)"
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="fit scaling laws L(C) (and L(N, D)) to the finished runs' final val losses; "
        "writes scaling_law.png and scaling_law.json (docs/scaling_laws.md)",
    )
    p.add_argument(
        "--predict",
        action="append",
        metavar="RUN_DIR",
        help="with --scaling: a run left out of the fit; print its predicted and measured loss (repeatable; "
        "default: none)",
    )
    p.add_argument(
        "--x",
        default=None,
        metavar="KEY",
        help="also plot final val loss against this swept key into report_<field>.png and print its "
        "best value per line and panel, e.g. optim.lr (default: no such plot)",
    )
    p.add_argument(
        "--lines",
        default=None,
        metavar="KEY",
        help="with --x: a line per value of this swept key (default: one line)",
    )
    p.add_argument(
        "--panels",
        default=None,
        metavar="KEY",
        help="with --x: a panel per value of this swept key (default: one panel)",
    )


def _report(args: argparse.Namespace) -> int:
    from jaxlm.report import main as report_main

    return report_main(args)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory (latest step) or one step directory")
    p.add_argument("--out", required=True, help="new directory for from_pretrained")
    p.add_argument("--max-shard-size", default="2GB", help="split weights into files of at most this")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weight dtype on disk (auto: the checkpoint's model.param_dtype)",
    )


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="src", required=True, help="directory written by save_pretrained")
    p.add_argument("--out", required=True, help="new run directory, e.g. runs/imported")
    p.add_argument(
        "--tokenizer",
        help="gpt2 | bytes | DIR (default: gpt2 when the directory has GPT-2's tokenizer files, "
        "else the experiment's)",
    )
    p.add_argument(
        "--experiment",
        help="experiment file supplying data/optim/train/mesh settings (default: jaxlm.config's defaults)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override non-model fields")


def _hf(module: str) -> Callable[[argparse.Namespace], int]:
    """The command whose ``main(args)`` is ``jaxlm.hf.<module>.main``."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            return importlib.import_module(f"jaxlm.hf.{module}").main(args)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


# name: (one line for `jaxlm --help`, the command's description, its arguments, what runs it)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable]] = {
    "train": (
        "pre-train a model from an experiment file",
        "Pre-train a model from an experiment file. A run (train.run_dir/name) continues from its latest "
        "checkpoint by default, with the data where it stopped; give it another name to start fresh.",
        _train_args,
        _train,
    ),
    "prepare": (
        "tokenize text/JSONL/Parquet files into token shards",
        "Tokenize a corpus into token shards for training (data.dir).",
        _prepare_args,
        _prepare,
    ),
    "bench": (
        "time the train step on synthetic data",
        "Time the train step on synthetic data: step time, tokens/s, TFLOP/s, MFU, memory.",
        _bench_args,
        _bench,
    ),
    "sample": ("sample text from a checkpoint", "Sample text from a checkpoint.", _sample_args, _sample),
    "eval": (
        "loss and perplexity of a checkpoint, or its accuracy on tasks",
        "Loss and perplexity of a checkpoint on one split of prepared data, or with --task its accuracy "
        "on multiple-choice and cloze tasks (docs/evals.md).",
        _eval_args,
        _eval,
    ),
    "lm-eval": (
        "run lm-evaluation-harness tasks on a checkpoint",
        "Run lm-evaluation-harness tasks on a checkpoint (pip install -e '.[eval]'): loglikelihood, "
        "loglikelihood_rolling and generate_until requests, offline, with task YAML files from "
        "--include-path (docs/evals.md).",
        _lm_eval_args,
        _lm_eval,
    ),
    "sweep": (
        "expand and run the sweep of an experiment file",
        "Expand and run the sweep of an experiment file; finished runs are skipped, others resume.",
        _sweep_args,
        _sweep,
    ),
    "report": (
        "tabulate and plot a sweep's runs",
        "Tabulate and plot a sweep's runs, best val loss first.",
        _report_args,
        _report,
    ),
    "export": (
        "write a checkpoint as a Hugging Face model",
        "Write a checkpoint as a Hugging Face transformers model (GPT2LMHeadModel or LlamaForCausalLM) "
        "with safetensors weights and, for BPE tokenizers, the tokenizer files.",
        _export_args,
        _hf("export"),
    ),
    "import": (
        "turn a Hugging Face GPT-2/Llama directory into a run",
        "Turn a local Hugging Face GPT-2 or Llama directory (config.json + safetensors) into a jaxlm run "
        "with a step-0 checkpoint that `jaxlm train --resume`, sampling and eval accept.",
        _import_args,
        _hf("importer"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxlm`` parser with one sub-parser per command; imports nothing heavy."""
    top = _Parser(
        prog="jaxlm",
        description="Readable, scalable language-model pre-training in JAX.",
        epilog="'jaxlm COMMAND --help' describes each command and its options.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, (summary, description, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description, formatter_class=_HelpFormatter)
        add_args(p)
        p.set_defaults(run=run)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        print(parser.format_help(), end="", file=sys.stderr)
        return 2
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help was printed
            return int(e.code or 0)
        return args.run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
