"""The CI's own scripts where they must not pass quietly: the cgroup v2 VM step fails naming
what it lacks, and is skipped only when asked to be (and says so)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers import skip_unless_others_reach_the_checkout

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def test_the_vm_step_is_skipped_only_on_request_and_says_so():
    done = subprocess.run(["bash", str(REPO / "ci/vm-tests")], capture_output=True, text=True,
                          env={**os.environ, "MINICTR_SKIP_VM": "1"}, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("SKIPPED on request (MINICTR_SKIP_VM=1)")


def test_the_vm_runner_without_a_kernel_fails_naming_it(tmp_path):
    """As a user who may not fetch the kernel: exit 125 and what to do, no VM and no skip."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to become a user who cannot fetch the kernel")
    skip_unless_others_reach_the_checkout()
    empty = tmp_path / "vm-cache"
    empty.mkdir()
    tmp_path.chmod(0o755)
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "bash", "-c", f"cd / && bash {REPO / 'ci/cgroup2-vm'} true"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "MINICTR_VM_CACHE": str(empty)})
    assert done.returncode == 125, done.stderr
    named = ("no VM kernel in", "qemu-system-x86_64 is missing")
    assert any(what in done.stderr for what in named), done.stderr
