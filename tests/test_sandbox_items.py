"""Every kind of item runs its call phase sandboxed (#27): unittest's TestCase methods,
doctests, other plugins' items; and what they report (subtests, a test that leaves
`sys.stdout` as None) reads as it would in process."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from tests.test_sandbox import run

pytest_plugins = ["pytester"]


@pytest.fixture
def host_dir():
    """A directory of the host's outside the inner sessions' trees (read-only to a body)."""
    path = tempfile.mkdtemp(prefix="minictr-items-", dir="/var/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


UNITTEST = """
import os, unittest, pytest

class Writes(unittest.TestCase):
    def setUp(self):
        self.pid = os.getpid()

    def test_writes_the_host(self):
        open({target!r}, "w").write("escaped")

@pytest.mark.container
class Marked(unittest.TestCase):
    def test_in_its_sandbox(self):
        assert os.getpid() == 2
"""


def test_a_unittest_testcase_runs_sandboxed(pytester, host_dir):
    target = f"{host_dir}/written"
    pytester.makepyfile(UNITTEST.format(target=target))
    result = run(pytester, "--minictr-sandbox-tests")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Read-only file system*"])
    assert not __import__("os").path.exists(target)
    result.stdout.fnmatch_lines(["minictr: sandboxed: every item's call phase (functions, "
                                 "unittest, doctests, other plugins' items*"])


DOCTESTED = '''
def pid():
    """
    >>> import os
    >>> os.getpid()
    2
    """
'''

DOCTEST_TEXT = """
>>> import os
>>> os.getpid()
2
"""


def test_doctests_run_sandboxed(pytester):
    pytester.makepyfile(doctested=DOCTESTED)
    pytester.maketxtfile(test_text=DOCTEST_TEXT)
    run(pytester, "--doctest-modules", "--minictr-sandbox-tests").assert_outcomes(passed=2)


PLUGIN_ITEMS = """
import os, pytest

class PidItem(pytest.Item):
    def runtest(self):
        assert os.getpid() == 2, os.getpid()

class PidFile(pytest.File):
    def collect(self):
        yield PidItem.from_parent(self, name="pid")

def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".pid":
        return PidFile.from_parent(parent, path=file_path)
"""


def test_other_plugins_items_run_sandboxed(pytester):
    pytester.makeconftest(PLUGIN_ITEMS)
    (pytester.path / "check.pid").write_text("")
    run(pytester, "--minictr-sandbox-tests").assert_outcomes(passed=1)


SUBTESTS = """
import unittest

def test_fixture(subtests):
    for n in range(3):
        with subtests.test(n=n):
            assert n != 1

class Case(unittest.TestCase):
    def test_subtest(self):
        for n in range(3):
            with self.subTest(n=n):
                self.assertNotEqual(n, 2)
"""


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["inline", "xdist"])
def test_failed_subtests_fail_the_run_as_in_process(pytester, workers):
    if workers:
        pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile(SUBTESTS)
    plain = run(pytester, *workers, "--junitxml=plain.xml")
    boxed = run(pytester, *workers, "--minictr-sandbox-tests", "--junitxml=boxed.xml")
    assert boxed.parseoutcomes() == plain.parseoutcomes()
    assert plain.parseoutcomes()["failed"] > 0 and boxed.ret == plain.ret != 0
    xml = [(pytester.path / name).read_text() for name in ("plain.xml", "boxed.xml")]
    assert xml[1].count("<failure") == xml[0].count("<failure") > 0


STDOUT_NONE = """
import sys

def test_leaves_stdout_none(monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)

def test_fails_with_stdout_none(monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)
    assert 1 == 2
"""


def test_a_test_that_leaves_stdout_none_reports_as_in_process(pytester):
    pytester.makepyfile(STDOUT_NONE)
    plain = run(pytester, "-rA")
    boxed = run(pytester, "-rA", "--minictr-sandbox-tests")
    assert boxed.parseoutcomes() == plain.parseoutcomes() == {"passed": 1, "failed": 1}
    assert "could not be set up" not in boxed.stdout.str()
    boxed.stdout.fnmatch_lines(["*assert 1 == 2*"])


IN_A_THREAD = """
import threading, pytest
from _pytest.runner import runtestprotocol

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    thread = threading.Thread(target=runtestprotocol, args=(item,), kwargs={"nextitem": nextitem})
    thread.start()
    thread.join()
    return True
"""


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_an_item_the_sandbox_cannot_fork_is_refused_out_loud(pytester, policy):
    pytester.makeconftest(IN_A_THREAD)
    pytester.makepyfile("def test_in_a_thread(): pass")
    result = run(pytester, "-rA", "--minictr-sandbox-tests", f"--minictr-unavailable={policy}")
    result.assert_outcomes(**{"failed" if policy == "fail" else "skipped": 1})
    result.stdout.fnmatch_lines(["*outside pytest's main thread*"])
