"""Whether a process still runs, read from /proc. A process can exit (and be reaped)
between any two looks, so every way of finding it gone means gone; a zombie nobody has
reaped yet counts as dead, since its command no longer runs."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # FileNotFoundError, or ProcessLookupError when reaped mid-read
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] not in ("Z", "X")
