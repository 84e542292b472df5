"""The comparison of tests/benchmarks/bench_suites.py (whose docstring says what it runs) on
JUnit files pytest wrote: the real suites take minutes and PyPI, this takes a second."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench_suites.py"

SUITE = """
import pytest

def test_same():
    pass

def test_differs():
    assert {ok}

@pytest.mark.xfail
def test_xfail():
    assert False

def test_skipped():
    pytest.skip("no")

def test_subtests(subtests):
    with subtests.test(n=1):
        assert {ok}
"""


def load_bench(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("bench_suites", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_suites", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_outcomes_are_compared_test_by_test(pytester, monkeypatch):
    bench = load_bench(monkeypatch)
    runs = []
    for ok in (True, False):
        pytester.makepyfile(test_suite=SUITE.format(ok=ok))
        junit = pytester.path / f"{ok}.xml"
        pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--junitxml={junit}")
        runs.append(bench.Run("plain" if ok else "sandboxed", 1, 1.0, 0,
                              bench.read_junit(junit), ""))
    assert runs[0].results["test_suite::test_xfail"].outcomes == ("xfailed",)
    assert runs[0].results["test_suite::test_skipped"].outcomes == ("skipped",)
    rows = bench.differences(*runs)
    assert [(name, was, now) for name, was, now, _ in rows] == [
        ("test_suite::test_differs", "passed", "failed"),
        ("test_suite::test_subtests", "passed", "failed")]
    assert "assert False" in rows[0][3]
