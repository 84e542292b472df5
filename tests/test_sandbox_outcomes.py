"""Outcomes of sandboxed bodies against the same tests in process (#27), for what real suites
do (tests/benchmarks/bench_suites.py found these): warnings, captured output, logging."""

from __future__ import annotations

import re

import pytest

pytest_plugins = ["pytester"]

INNER_TIMEOUT = 240

WARNS_AND_PRINTS = """
import logging, sys, warnings, pytest

def test_warns():
    warnings.warn("old api", DeprecationWarning)

def test_warning_as_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.warn("now an error", UserWarning)

@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_warning_marked_error():
    warnings.warn("marked error", RuntimeWarning)

def test_recwarn(recwarn):
    warnings.warn("recorded", UserWarning)
    assert len(recwarn) == 1

def test_prints_and_fails(capsys):
    print("to stdout")
    print("to stderr", file=sys.stderr)
    logging.getLogger("suite").warning("logged")
    assert capsys.readouterr().out == "to stdout\\n"
    print("after readouterr")
    assert False
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args,
                                         timeout=INNER_TIMEOUT)


def _junit_without_times(text: str) -> str:
    return re.sub(r' (time|timestamp|hostname)="[^"]*"|0x[0-9a-f]+', "", text)


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["inline", "xdist"])
def test_warnings_and_captured_output_read_as_in_process(pytester, workers):
    if workers:
        pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile(WARNS_AND_PRINTS)
    plain = run(pytester, *workers, "-rA", "-o", "junit_logging=all", "--junitxml=plain.xml")
    boxed = run(pytester, *workers, "-rA", "-o", "junit_logging=all", "--junitxml=boxed.xml",
                "--minictr-sandbox-tests")
    assert boxed.parseoutcomes() == plain.parseoutcomes() == {
        "passed": 2, "failed": 3, "warnings": 1}
    for text in ("*DeprecationWarning: old api*", "*- Captured stdout call -*",
                 "after readouterr", "*WARNING*suite*logged*",
                 "*UserWarning: now an error*", "*RuntimeWarning: marked error*"):
        boxed.stdout.fnmatch_lines([text])
    assert _junit_cases(pytester, "boxed.xml") == _junit_cases(pytester, "plain.xml")


def _junit_cases(pytester: pytest.Pytester, name: str) -> list[str]:
    """The file's test cases, without times and addresses, in order (the workers' order
    varies from run to run)."""
    text = _junit_without_times((pytester.path / name).read_text())
    return sorted(case.split("</testcase>")[0] for case in text.split("<testcase"))


SUBTESTS = """
import unittest, warnings

def test_fixture(subtests):
    for n in range(3):
        with subtests.test(msg="checks", n=n):
            print("subtest", n)
            assert n != 1
    warnings.warn("after the subtests", UserWarning)

class Case(unittest.TestCase):
    def test_subtest(self):
        for n in range(3):
            with self.subTest(n=n):
                self.assertNotEqual(n, 2)

    def test_skips_a_subtest(self):
        with self.subTest("skipped"):
            self.skipTest("not here")
"""


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["inline", "xdist"])
def test_subtests_read_as_in_process_to_the_junit_file(pytester, workers):
    if workers:
        pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile(SUBTESTS)
    plain = run(pytester, *workers, "-rA", "--junitxml=plain.xml")
    boxed = run(pytester, *workers, "-rA", "--junitxml=boxed.xml", "--minictr-sandbox-tests")
    assert boxed.parseoutcomes() == plain.parseoutcomes()
    summary = [line for line in plain.stdout.lines if line.startswith(("SUB", "PASSED",
                                                                        "FAILED", "SKIPPED"))]
    assert summary
    for line in summary:  # in the order the workers ended them
        boxed.stdout.fnmatch_lines([line])
    assert _junit_cases(pytester, "boxed.xml") == _junit_cases(pytester, "plain.xml")
