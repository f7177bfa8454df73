"""Run logging: scalars to TensorBoard events (without TensorFlow) and/or a Weights & Biases run
(``train.loggers``), a progress bar on a terminal, plain lines otherwise. Only process 0 writes."""

from __future__ import annotations

import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import jax

from jaxlm.config import ConfigError

WANDB_ID = "wandb_id.txt"  # in the run directory: a resumed run goes on in the same W&B run


def check_loggers(loggers: tuple[str, ...]) -> None:
    """Refuse, before anything runs, a logger whose package is not installed."""
    if "wandb" in loggers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "train.loggers includes 'wandb', which is not installed: pip install 'jaxlm[wandb]' "
                "(or drop it: --set train.loggers=tensorboard)"
            ) from None


class RunLogger:
    def __init__(
        self,
        run_path: Path,
        total_steps: int,
        start_step: int = 0,
        loggers: tuple[str, ...] = ("tensorboard",),
        config: dict[str, Any] | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.tb = None
        self.wandb = None
        self.bar = None
        if not self.enabled:
            return
        if "tensorboard" in loggers:
            from tensorboard.summary import Writer

            self.tb = Writer(str(run_path / "tb"))
        if "wandb" in loggers:
            self.wandb = _wandb_run(run_path, config or {})
        self.log_file = open(run_path / "log.txt", "a")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(prefix + k, float(v), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({prefix + k: float(v) for k, v in values.items()}, step=step)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        self.log_file.write(text + "\n")
        self.log_file.flush()
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """Per-log-step display: the progress bar's postfix on a terminal, a plain line otherwise."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}")
            self.log_file.write(format_metrics(step, values) + "\n")
            self.log_file.flush()
        else:
            self.line(format_metrics(step, values))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.log_file.close()


def _wandb_run(run_path: Path, config: dict[str, Any]):
    """A W&B run named after the run, in the group of its sweep when a sweep started it (the sweep
    directory holds ``sweep.json``), with the run's config. Its id is kept in the run directory, so
    a resumed run logs on in the same W&B run. ``WANDB_PROJECT`` names the project (default
    "jaxlm"); ``WANDB_MODE=offline``, ``WANDB_DIR`` (default: the run directory) and W&B's other
    variables apply as usual."""
    import wandb

    from jaxlm.sweep import SWEEP_FILE

    id_file = run_path / WANDB_ID
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4) + "\n")  # W&B's own ids are 8 such characters
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "jaxlm"),
        name=run_path.name,
        group=run_path.parent.name if (run_path.parent / SWEEP_FILE).is_file() else None,
        config=config,
        id=id_file.read_text().strip(),
        resume="allow",
        dir=os.environ.get("WANDB_DIR", str(run_path)),
    )


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverging run still logs a finite number."""
    return math.exp(min(loss, 50.0))


def format_metrics(step: int, m: dict[str, float]) -> str:
    return (
        f"step {step:6d} | loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | grad_norm {m['grad_norm']:.3f}"
        f" | lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | {m['step_time'] * 1000:.0f} ms/step"
    )
