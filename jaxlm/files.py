"""JSON files of a run (config.json, summary.json, a sweep's records): written atomically, read
leniently."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any) -> None:
    """Write via a temp file and rename, so a crash never leaves half a JSON file."""
    tmp = path.with_suffix(path.suffix + f".tmp{time.time_ns()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def read_json(path: Path) -> Any | None:
    """The JSON value in ``path``, or None when the file is missing or not valid JSON: a run's
    records that are not there yet, or were cut short or edited by hand, read as "nothing recorded"."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
