"""Run logging: TensorBoard events (without TensorFlow), a progress bar on a terminal, plain
lines otherwise. Only process 0 writes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax


class RunLogger:
    def __init__(self, run_path: Path, total_steps: int, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        from tensorboard.summary import Writer

        self.tb = Writer(str(run_path / "tb"))
        self.log_file = open(run_path / "log.txt", "a")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(prefix + k, float(v), step)
        self.tb.flush()

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
        self.tb.close()
        self.log_file.close()


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverging run still logs a finite number."""
    return math.exp(min(loss, 50.0))


def format_metrics(step: int, m: dict[str, float]) -> str:
    return (
        f"step {step:6d} | loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | grad_norm {m['grad_norm']:.3f}"
        f" | lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | {m['step_time'] * 1000:.0f} ms/step"
    )
