"""Crash-safe file writes: a file either has its old content or its complete new content.

Writers put the bytes in a hidden temp file in the same folder (`.<name>.<hex>.tmp`), fsync
it, and rename it into place. A process killed mid-write leaves only such a temp file, which
no reader looks at; `sweep_temp_files` removes them when a run (the folder's only writer)
starts again.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_path(final: Path) -> Path:
    """A fresh hidden temp name beside `final`."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` in one rename (after fsync); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_bytes_atomically(path, text.encode("utf-8"))


def sweep_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files a killed writer left anywhere under `folder`; returns them.
    Call only when no writer is active there (e.g. when a run starts or resumes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
