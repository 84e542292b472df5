"""The README's first commands as a newcomer pastes them, from a copy of the checkout into a
fresh venv: the "Install and try it" block (the venv, `pip install`, `minictr doctor` and
`minictr run --memory 64M -- echo hello` through the venv's own path under sudo), then the
"Testing it" block's tox, installed into that venv, whose `-e py` is the quick check.

Lines that install system packages (`sudo apt install ...`) are not run: a test installs
nothing on the host (ci/install-deps does, for CI). `sudo` runs as written where there is one
(we are root, so it asks for no password); a machine without sudo runs the command without
it. pip installs from the copy with build isolation, as the README's line does: its build
needs setuptools>=77 (PEP 639's license field), newer than a fresh venv's own, so pip fetches
it (from the index pip is configured with) as it would for the user."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 480  # seconds for the whole block: the venv, pip, the native core's build
# What a newcomer's copy would not hold: our builds, venvs and caches.
NOT_IN_A_CHECKOUT = shutil.ignore_patterns(".git", ".tox", ".venv", "build", "dist", "*.egg-info",
                                           "__pycache__", ".hypothesis", ".pytest_cache",
                                           "minictr-init")
# sudo as written where it exists, keeping the test's own cache and state directories
# (sudo's env_reset would drop them); the command alone where there is no sudo
SUDO = ('sudo() { if type -P sudo >/dev/null; then command sudo '
        '--preserve-env=MINICTR_CACHE_DIR,MINICTR_STATE_DIR "$@"; else "$@"; fi; }')


def shell_blocks(after: str) -> list[str]:
    """The README's first ```sh block after the heading `after`, as its lines."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"\n## {after}\n"):]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0].splitlines()


def script_of(lines: list[str]) -> str:
    """The lines as a bash script that stops at the first failure, package installs left out."""
    run = [line for line in lines if line.strip() and not line.startswith("sudo apt")]
    return "\n".join(["set -euxo pipefail", SUDO, *run])


@pytest.fixture
def checkout(tmp_path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the README's commands use sudo: run as root")
    copy = tmp_path / "pytest-minictr"
    shutil.copytree(REPO, copy, ignore=NOT_IN_A_CHECKOUT, symlinks=True)
    return copy


def run_block(lines: list[str], checkout: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script_of(lines)], cwd=checkout, capture_output=True, text=True,
        timeout=INSTALL_TIMEOUT,
        env={**os.environ, "MINICTR_CACHE_DIR": str(checkout / "cache"),
             "MINICTR_STATE_DIR": str(checkout / "state"), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
             "PYTHONPATH": ""})


def test_the_readmes_first_commands_work_in_a_fresh_venv(checkout):
    install = shell_blocks("Install and try it")
    venv = next(i for i, line in enumerate(install) if line.startswith("python3 -m venv .venv"))
    # Debian's and Ubuntu's python3 come without venv's ensurepip: the package comes first
    assert any("apt install python3-venv" in line for line in install[:venv]), install
    assert install[-1].startswith("sudo .venv/bin/minictr run --memory 64M -- echo hello")
    done = run_block(install, checkout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.endswith("hello\n"), done.stdout[-3000:]
    # the venv's minictr is the copy's, with its own native core built by the install
    assert (checkout / "pytest_minictr/container/native/minictr-init").exists() \
        or not shutil.which("gcc")

    testing = shell_blocks("Testing it")  # tox into the same venv; -e py the quick check
    assert testing[0] == ".venv/bin/pip install tox", testing
    assert testing[1].startswith("sudo .venv/bin/tox -e py ") and "quick" in testing[1]
    assert testing[2].startswith("sudo .venv/bin/tox ") and "full run" in testing[2]
    done = run_block([testing[0], "sudo .venv/bin/tox config -e py -k commands"], checkout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "python -m pytest" in done.stdout, done.stdout
