"""Small waits shared by the tests that watch processes come and go from outside."""

from __future__ import annotations

import time
from pathlib import Path


def eventually(predicate, timeout: float = 10.0) -> bool:
    """Whether `predicate()` came true within `timeout` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def process_gone(pid: int | None) -> bool:
    """No such process runs (a zombie waiting for its parent runs no more)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"
