"""`boss serve` in a background thread of the test process, on a free port."""

from boss.server import serving

__all__ = ["serving"]
