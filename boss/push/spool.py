"""Standard input spooled to a file, so that a push can read it twice."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def spool_stdin(stream: Any, directory: Path, limit: int | None = None) -> Path:
    """Copy standard input to a file so that it can be read twice.

    At most ``limit`` + 1 bytes are copied: one more than the limit is enough to
    refuse the push, and an endless stream must not fill the disk.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="push-", suffix=".jsonl", dir=directory)
    left = limit + 1 if limit is not None else None
    with os.fdopen(fd, "wb") as out:
        while left is None or left > 0:
            chunk = stream.read(1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            if left is not None:
                left -= len(chunk)
    return Path(name)

