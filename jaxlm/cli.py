"""The ``jaxlm`` command: thin dispatch to the modules that do the work."""

from __future__ import annotations

import argparse
import sys

from jaxlm.config import ConfigError
from jaxlm.data.prepare import DataError


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxlm train", description="Pre-train a model from an experiment file.")
    p.add_argument("experiment", help="experiments/NAME.py exposing get_config()")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", default=None, help="require a checkpoint to resume from")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to continue an old run")
    args = p.parse_args(argv)
    from jaxlm.config import load_config

    cfg = load_config(args.experiment, args.set)
    from jaxlm import train

    train.run(cfg, resume=args.resume)
    return 0


def _prepare(argv: list[str]) -> int:
    from jaxlm.data.prepare import prepare_main

    return prepare_main(argv)


def _bench(argv: list[str]) -> int:
    from jaxlm.bench import bench_main

    return bench_main(argv)


def _sample(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxlm sample", description="Sample text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run dir (latest step) or one step dir")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per non-empty line")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the nucleus of this mass (1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    args = p.parse_args(argv)
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


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxlm eval", description="Loss and perplexity of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run dir (latest step) or one step dir")
    p.add_argument("--data", help="prepared data dir (default: the run's data.dir)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--batches", type=int, help="batches to evaluate (default: train.eval_batches; 0: all)")
    p.add_argument("--batch-size", type=int, help="global batch (default: the run's)")
    args = p.parse_args(argv)
    from jaxlm.data.prepare import DataError
    from jaxlm.evaluate import evaluate_checkpoint

    try:
        r = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batches, args.batch_size)
    except (FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"step {r['step']} | {r['split']} split of {r['data']} | {r['batches'] or 'all'} batches of "
        f"{r['batch_size']} | loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f}"
    )
    return 0


def _sweep(argv: list[str]) -> int:
    from jaxlm.sweep import main as sweep_main

    return sweep_main(argv)


def _report(argv: list[str]) -> int:
    from jaxlm.report import main as report_main

    return report_main(argv)


def _hf(name: str):
    def run(argv: list[str]) -> int:
        from jaxlm import hf

        try:
            return getattr(hf, name)(argv)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


COMMANDS = {
    "train": _train,
    "prepare": _prepare,
    "bench": _bench,
    "sample": _sample,
    "eval": _eval,
    "sweep": _sweep,
    "report": _report,
    "export": _hf("export_main"),
    "import": _hf("import_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
            return 2
        print(f"usage: jaxlm COMMAND [ARGS]\ncommands: {known}\n'jaxlm COMMAND --help' for each")
        return 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
