"""safetensors without the safetensors package: an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw little-endian bytes. A large
model is split into several files listed by ``model.safetensors.index.json``, as transformers does."""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm.config import ConfigError

DTYPES = {"F32": np.dtype("float32"), "F16": np.dtype("float16"), "BF16": np.dtype(jax.numpy.bfloat16)}
"""safetensors dtype name -> numpy dtype, for the dtypes jaxlm writes and reads."""
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"

Spec = tuple[str, tuple[int, ...], np.dtype]  # (tensor name, shape, dtype)


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def write_dir(
    directory: Path, specs: list[Spec], arrays: Iterator[np.ndarray], max_bytes: int, write: bool = True
) -> list[str]:
    """Write ``arrays`` (produced one at a time, in ``specs`` order) into ``directory`` as
    ``model.safetensors``, or as files of at most ``max_bytes`` listed by the index; returns the
    file names. ``write=False`` only consumes ``arrays`` (processes that just take part in gathers)."""
    groups = _shards(specs, max_bytes)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )
    if not write:
        for _ in arrays:
            pass
        return names
    for name, group in zip(names, groups, strict=True):
        write_file(directory / name, [specs[j] for j in group], itertools.islice(arrays, len(group)))
    if len(groups) > 1:
        weight_map = {specs[j][0]: name for name, g in zip(names, groups, strict=True) for j in g}
        total = sum(nbytes(s, d) for _, s, d in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _shards(specs: list[Spec], max_bytes: int) -> list[list[int]]:
    """Group tensor indices into files of at most ``max_bytes`` (a larger tensor gets its own)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = nbytes(shape, dtype)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def write_file(path: Path, specs: list[Spec], arrays: Iterator[np.ndarray]) -> None:
    """Write ``arrays`` (produced one at a time, in ``specs`` order) as one safetensors file."""
    assert sys.byteorder == "little", "safetensors is little-endian; this host is not"
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers checks "format"
    offset = 0
    for name, shape, dtype in specs:
        size = nbytes(shape, dtype)
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), arr in zip(specs, arrays, strict=True):
            if arr.shape != shape or arr.dtype != dtype:
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape} {dtype}")
            f.write(np.ascontiguousarray(arr).view(np.uint8))  # little-endian hosts only


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(name -> {dtype, shape, data_offsets}, where the data starts) of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsDir:
    """The tensors of a Hugging Face model directory (one file or an index of shards), memory-mapped."""

    def __init__(self, directory: Path):
        index = directory / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            bins = sorted(p.name for p in directory.glob("*.bin"))
            hint = (
                f" (found {bins}: load it in transformers and save_pretrained(DIR, safe_serialization=True))"
                if bins
                else ""
            )
            raise FileNotFoundError(
                f"{directory} has no model.safetensors or model.safetensors.index.json{hint}"
            )
        self.where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name in files:
            header, start = read_header(directory / name)
            for key, info in header.items():
                if info["dtype"] not in DTYPES:
                    raise ConfigError(
                        f"{directory / name}: tensor {key} has dtype {info['dtype']}; jaxlm reads "
                        f"{sorted(DTYPES)}"
                    )
                self.where[key] = (directory / name, info, start)

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, start = self.where[name]
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        if end - begin != nbytes(shape, dtype):
            raise ConfigError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {dtype}")
        return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (bytes); as transformers does."""
    t = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            t, mult = t[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        value = float(t) * mult
    except ValueError:
        raise ConfigError(f"--max-shard-size={text!r} is not a size; write e.g. 2GB, 500MB or 1GiB") from None
    if value <= 0:
        raise ConfigError(f"--max-shard-size={text!r} must be positive")
    return int(value)
