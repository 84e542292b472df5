"""Session-wide writable paths of sandboxed bodies (#27): --minictr-writable and the ini's
minictr_writable, as a suite that keeps Hypothesis's database meets them."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.unprivileged import account_fixture, place_with_tests

pytest_plugins = ["pytester"]

INNER_TIMEOUT = 240

WRITES = """
import errno, os, pytest

@pytest.mark.container(writable=[{marked!r}])
def test_writes_where_allowed():
    for path in ("data/ini", "cli/given", {marked!r} + "/marked"):
        open(path, "w").write("ok")
    with pytest.raises(OSError) as error:
        open("elsewhere", "w")
    assert error.value.errno == errno.EROFS

def test_every_body_may_write_the_session_paths():
    open("data/second", "w").write("ok")
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args,
                                         timeout=INNER_TIMEOUT)


def test_session_paths_add_to_the_markers_and_missing_ones_are_made(pytester):
    marked = tempfile.mkdtemp(prefix="minictr-writable-")
    try:
        pytester.makeini("[pytest]\nminictr_writable = data\n")
        pytester.mkdir("cli")
        pytester.makepyfile(WRITES.format(marked=marked))
        result = run(pytester, "--minictr-sandbox-tests", "--minictr-writable", "cli")
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines([
            f"minictr: sandboxed bodies may also write: {pytester.path}/data, "
            f"{pytester.path}/cli"])
        assert sorted(os.listdir(pytester.path / "data")) == ["ini", "second"]
        assert os.listdir(pytester.path / "cli") == ["given"]
        assert os.listdir(marked) == ["marked"]
        assert not (pytester.path / "elsewhere").exists()
    finally:
        shutil.rmtree(marked)


HYPOTHESIS = """
from hypothesis import given, settings, strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

# (Hypothesis's CI profile, chosen where CI is set, keeps no database)
settings.register_profile("db", database=DirectoryBasedExampleDatabase(".hypothesis/examples"))
settings.load_profile("db")

@given(st.integers())
def test_small(x):
    assert x < 10
"""


def test_hypothesis_keeps_its_failing_example_in_its_database(pytester):
    """Without the path writable, Hypothesis warns (an error where a suite's filterwarnings
    says so) and keeps its examples in memory: they are lost with the body."""
    pytest.importorskip("hypothesis")
    pytester.makeini("[pytest]\nminictr_writable = .hypothesis\n")
    pytester.makepyfile(HYPOTHESIS)
    result = run(pytester, "--minictr-sandbox-tests")
    result.assert_outcomes(failed=1)
    result.stdout.no_fnmatch_line("*HypothesisWarning*")
    assert list((pytester.path / ".hypothesis" / "examples").iterdir())


def test_a_path_that_cannot_be_made_is_a_usage_error(pytester):
    pytester.makefile(".txt", afile="")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = run(pytester, "--minictr-writable", "afile.txt/sub")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--minictr-writable=*afile.txt/sub'*: missing, and it "
                                 "cannot be made (Not a directory)*"])


ROOTLESS = """
import errno, os, pytest

def test_writes_the_session_path():
    open("data/written", "w").write("ok")
    with pytest.raises(OSError) as error:
        open("elsewhere", "w")
    assert error.value.errno == errno.EROFS
"""

account = account_fixture("mcwr")


def test_rootless_body_writes_the_session_paths(account):
    """As a real account: the path made by it, bound writable in the body's own user
    namespace, the rest of its tree read-only."""
    with place_with_tests(account, "minictr-writable-site-", ROOTLESS) as (runner, place, tests):
        done = runner("-m", "pytest", "-p", "pytest_minictr.plugin", "-p", "no:cacheprovider",
                      "-rA", f"--basetemp={place}/home/tmp", "--minictr-sandbox-tests",
                      "--minictr-writable", "data", str(tests), cwd=tests)
        assert "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
        assert (tests / "data" / "written").read_text() == "ok"
        assert (tests / "data").stat().st_uid == account.uid
        assert not (tests / "elsewhere").exists()
