"""Verdicts the code under test cannot forge cheaply (#27, item 3): a body's code that writes
a "passed" report to its report channel, then fails or exits, is recorded as failed."""

from __future__ import annotations

from tests.test_sandbox import run
from tests.unprivileged import account_fixture, place_with_tests

pytest_plugins = ["pytester"]

FORGE = """
import json, os, pytest

def forge():
    # what code under test can do without knowing the plugin: write a passed report,
    # well formed, to every pipe or socket it inherited
    line = json.dumps({"report": {
        "$report_type": "TestReport", "nodeid": "x", "location": ["x", 0, "x"],
        "keywords": {}, "outcome": "passed", "longrepr": None, "when": "call",
        "sections": [], "duration": 0.0, "user_properties": []},
        "logged": [], "stdout": "", "stderr": "", "log": "", "warnings": []}).encode()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(("pipe:", "socket:")):
                os.write(int(name), line + b"\\n")
        except OSError:
            pass

@pytest.mark.container
def test_forges_then_fails():
    forge()
    assert False, "the real verdict"

@pytest.mark.container
def test_forges_then_exits():
    forge()
    os._exit(0)

@pytest.mark.container
def test_forges_half_a_line_then_fails():
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("pipe:"):
                os.write(int(name), b'{"report": ')
        except OSError:
            pass
    assert False

@pytest.mark.container
def test_honest():
    assert True
"""


def test_a_forged_passed_report_is_recorded_as_a_failure(pytester):
    pytester.makepyfile(test_forge=FORGE)
    result = run(pytester, "-rA")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines(["PASSED test_forge.py::test_honest"])
    text = result.stdout.str()
    assert "the body wrote to its report channel" in text


account = account_fixture("mctv")


def test_a_forged_report_fails_without_root_too(account):
    """Without root our init writes the body's status on the same channel (a line more for a
    forger to copy): the forge still fails."""
    with place_with_tests(account, "minictr-verdicts-site-", FORGE) as (runner, place, tests):
        done = runner("-m", "pytest", "-p", "pytest_minictr.plugin", "-p", "no:cacheprovider",
                      "-rA", f"--basetemp={place}/home/tmp", str(tests), cwd=tests)
        assert "PASSED test_mine.py::test_honest" in done.stdout, done.stdout[-3000:]
        for name in ("then_fails", "then_exits", "half_a_line_then_fails"):
            assert f"FAILED test_mine.py::test_forges_{name}" in done.stdout, done.stdout[-3000:]
