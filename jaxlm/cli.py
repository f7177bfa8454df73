"""The ``jaxlm`` command: thin dispatch to the modules that do the work."""

from __future__ import annotations

import argparse
import sys

from jaxlm.config import ConfigError


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


COMMANDS = {
    "train": _train,
    "prepare": _prepare,
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
