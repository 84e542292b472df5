"""The soak's short mode (tests/benchmarks/soak.py, whose docstring gives the full one): mixed
runs from one process and from two, with nothing leaked on the host and every outcome right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent / "benchmarks" / "soak.py"


@pytest.mark.parametrize("runs, workers", [(300, 1), (100, 2)])
def test_short_soak_leaks_nothing(runs, workers):
    if os.geteuid() != 0:
        pytest.skip("the soak's OOM runs need cgroup limits (root)")
    done = subprocess.run([sys.executable, str(SOAK), "--runs", str(runs), "--workers",
                           str(workers), "--json"], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and not report["failed"], report
    for worker in report["workers"]:
        assert worker["runs"] == runs and worker["leaks"] == {} and worker["wrong_count"] == 0
        # flat: a few pages of allocator slack, not a leak per run
        assert worker["launcher_end_kib"] - worker["launcher_start_kib"] < 2048
        assert worker["caller_end_kib"] - worker["caller_start_kib"] < 2048
