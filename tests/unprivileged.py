"""pytest for an unprivileged user: this machine's Python and site-packages may live under
/root, closed to others, so pytest's pure-Python packages are copied where any user may read
them, for the system interpreter of the same minor version."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

from tests.helpers import skip_unless_others_reach_the_checkout

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
PYTEST_DISTRIBUTIONS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")

Runner = Callable[..., subprocess.CompletedProcess]


def user_site(place: Path) -> Path:
    """pytest's packages copied into `place`/site, and `place` opened to every user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become an unprivileged user (setpriv)")
    if not shutil.which("setpriv") or not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"needs setpriv and {SYSTEM_PYTHON}")
    skip_unless_others_reach_the_checkout()
    site = place / "site"
    for name in PYTEST_DISTRIBUTIONS:
        distribution = metadata.distribution(name)
        for file in distribution.files or ():
            source = Path(distribution.locate_file(file))
            if ".." not in file.parts and source.is_file():
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, site / file)
    for directory, _, _ in os.walk(place):
        os.chmod(directory, 0o755)
    return site


def python_as(uid: int, gid: int, home: Path, site: Path) -> Runner:
    """A runner of the system Python as `uid`:`gid` (setpriv, supplementary groups cleared),
    with pytest and this checkout importable."""
    def run(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*python_command_as(uid, gid), *args], env=user_environment(home, site),
            cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    return run


def python_command_as(uid: int, gid: int) -> list[str]:
    """The system Python as `uid`:`gid`, supplementary groups cleared (its arguments follow)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", SYSTEM_PYTHON]


def user_environment(home: Path, site: Path) -> dict[str, str]:
    """pytest and this checkout importable; no plugin loads unless named (-p)."""
    return {"PYTHONPATH": f"{site}:{REPO}", "HOME": str(home), "PATH": "/usr/bin:/bin",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def pytest_for(uid: int, place: Path) -> Runner:
    """`python_as` the user `uid` (group `uid`), with a home of its own in `place`."""
    site = user_site(place)
    home = place / "home"
    home.mkdir()
    os.chown(home, uid, uid)
    return python_as(uid, uid, home, site)
