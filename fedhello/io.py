"""Files: atomic writes (a reader never sees half a file, and a crash leaves the old one intact)
and fedhello's one cache folder."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: Path, data: str | bytes | Callable[[IO[bytes]], None]) -> None:
    """Write `data` (text, bytes, or a function that writes to a binary file) to a temporary file
    beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Pretty-printed JSON, written atomically."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def cache_root() -> Path:
    """fedhello's cache folder: $FEDHELLO_CACHE_DIR or ~/.cache/fedhello. Models, tokens, images
    and calibrated cost models each have a subfolder."""
    return Path(os.environ.get("FEDHELLO_CACHE_DIR") or "~/.cache/fedhello").expanduser()
