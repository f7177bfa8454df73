"""Tokenizers that work offline: GPT-2 BPE (tiktoken over vendored files) and raw bytes.

A tokenizer is named by a spec string stored in the data index and in checkpoints, so a
checkpoint alone says how to turn its tokens back into text: ``gpt2``, ``bytes``, or a directory
holding ``vocab.bpe`` + ``encoder.json`` in the GPT-2 format.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GPT2_DIR = Path(__file__).parent / "gpt2"
# The GPT-2 pre-tokenizer split, as in tiktoken_ext.openai_public.gpt2.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class Tokenizer:
    spec: str
    vocab_size: int
    eot_id: int
    """End-of-document token appended after every document."""
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


def _bytes_tokenizer() -> Tokenizer:
    # 256 byte values plus one end-of-document id.
    return Tokenizer(
        spec="bytes",
        vocab_size=257,
        eot_id=256,
        encode=lambda s: list(s.encode("utf-8", errors="replace")),
        decode=lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"),
    )


def _bpe_tokenizer(spec: str, directory: Path) -> Tokenizer:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab, encoder = directory / "vocab.bpe", directory / "encoder.json"
    for f in (vocab, encoder):
        if not f.is_file():
            raise FileNotFoundError(
                f"tokenizer {spec!r}: {f} is missing; a BPE tokenizer directory needs vocab.bpe and "
                "encoder.json in the GPT-2 format"
            )
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab), encoder_json_file=str(encoder))
    eot = len(ranks)
    enc = tiktoken.Encoding(
        name=f"jaxlm-{directory.name}",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": eot},
    )
    return Tokenizer(
        spec=spec,
        vocab_size=eot + 1,
        eot_id=eot,
        encode=enc.encode_ordinary,
        decode=lambda ids: enc.decode([int(i) for i in ids if int(i) <= eot], errors="replace"),
    )


@functools.cache
def get_tokenizer(spec: str) -> Tokenizer:
    if spec == "bytes":
        return _bytes_tokenizer()
    if spec == "gpt2":
        return _bpe_tokenizer("gpt2", GPT2_DIR)
    path = Path(spec)
    if path.is_dir():
        return _bpe_tokenizer(str(path.resolve()), path)
    raise ValueError(
        f"unknown tokenizer {spec!r}; use 'gpt2', 'bytes', or a directory with vocab.bpe and encoder.json"
    )
