"""pytest for an unprivileged user: this machine's Python and site-packages may live under
/root, closed to others, so pytest's pure-Python packages are copied where any user may read
them, for the system interpreter of the same minor version."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

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


def pytest_for(uid: int, place: Path, gid: int | None = None) -> Runner:
    """`python_as` the user `uid` (group `gid`, by default `uid`), with a home of its own in
    `place`."""
    gid = uid if gid is None else gid
    site = user_site(place)
    home = place / "home"
    home.mkdir()
    os.chown(home, uid, gid)
    return python_as(uid, gid, home, site)


class UserAccount(NamedTuple):
    uid: int
    gid: int  # its own group's: useradd gives the next free gid, not always its uid


def account_fixture(prefix: str) -> Callable[[], Iterator[UserAccount]]:
    """A module-scoped fixture: a real unprivileged account made with useradd (with the
    subordinate ids useradd grants, where it does), removed after the module."""
    @pytest.fixture(scope="module")
    def account() -> Iterator[UserAccount]:
        if os.geteuid() != 0 or not shutil.which("useradd"):
            pytest.skip("needs root and useradd to make an account")
        name = f"{prefix}{os.getpid() % 100000}"
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, timeout=30)
        try:
            entry = pwd.getpwnam(name)
            yield UserAccount(entry.pw_uid, entry.pw_gid)
        finally:
            subprocess.run(["userdel", name], check=False, timeout=30)
    return account


@contextlib.contextmanager
def place_with_tests(account: UserAccount, prefix: str, source: str
             ) -> Iterator[tuple[Runner, Path, Path]]:
    """A place for `account`'s own pytest run, removed after: a runner of pytest as the
    account, the place (its home below), and a tests directory holding test_mine.py."""
    place = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        os.chmod(place, 0o755)
        runner = pytest_for(account.uid, place, account.gid)
        tests = place / "tests"
        tests.mkdir()
        (tests / "test_mine.py").write_text(source)
        os.chown(tests, account.uid, account.gid)
        yield runner, place, tests
    finally:
        shutil.rmtree(place)
