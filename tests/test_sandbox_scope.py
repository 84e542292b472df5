"""Sandboxes shared by many tests (#27, item 5): `--minictr-sandbox-scope module|session`
runs the tests of a module, or a worker's whole share, one after another in one sandbox,
fixtures included; each test is reported as it ends, and a sandbox that dies fails only the
test it was running."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest

from tests.test_sandbox import run
from tests.unprivileged import account_fixture, place_with_tests

pytest_plugins = ["pytester"]

SHARED = """
import os, pytest

WORKER = int(os.environ["WORKER_PID"])

@pytest.fixture(scope="session")
def setup_pid():
    return os.getpid()

@pytest.fixture(scope="session")
def host_writer():
    # a fixture runs in the sandbox too: the host stays read-only to it
    with pytest.raises(OSError):
        open({target!r}, "w")
"""

FIRST = """
import os, sys, warnings, pytest
import shared_state

def test_one(setup_pid, host_writer, tmp_path):
    (tmp_path / "x").write_text("writable")
    shared_state.SEEN.append("one")
    print("one speaks")
    assert os.getpid() == setup_pid != int(os.environ["WORKER_PID"])

def test_two(setup_pid):
    shared_state.SEEN.append("two")
    warnings.warn("careful", UserWarning)
    assert shared_state.SEEN[-2:] == ["one", "two"] and os.getpid() == setup_pid

def test_three_fails():
    assert shared_state.SEEN == ["nothing"], "a real failure"

def test_four_dies():
    os._exit(3)

def test_five_after_a_new_sandbox():
    assert shared_state.SEEN == []
"""

SECOND = """
import shared_state

def test_second_module():
    shared_state.SEEN.append("second")
    print("SEEN", shared_state.SEEN)
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    target = os.path.join(tempfile.mkdtemp(prefix="minictr-scope-", dir="/var/tmp"), "x")
    monkeypatch.setenv("WORKER_PID", "0")
    pytester.makeconftest(SHARED.format(target=target)
                          + "\nos.environ['WORKER_PID'] = str(os.getpid())\n")
    pytester.makepyfile(shared_state="SEEN = []\n", test_first=FIRST, test_second=SECOND)
    yield pytester
    assert not os.path.exists(target)
    shutil.rmtree(os.path.dirname(target))


def outcomes_and_seen(result: pytest.RunResult) -> tuple[dict[str, int], list[str]]:
    return result.parseoutcomes(), re.findall(r"SEEN \[(.*)\]", result.stdout.str())


def test_session_scope_shares_one_sandbox_fixtures_included(suite):
    result = run(suite, "--minictr-sandbox-tests", "--minictr-sandbox-scope", "session",
                 "-rA", "-p", "no:randomly")
    text = result.stdout.str()
    assert ("minictr: sandbox scope: session (one sandbox for the worker's share; fixtures "
            "in it)") in text
    result.stdout.fnmatch_lines(["PASSED test_first.py::test_one",
                                 "PASSED test_first.py::test_two",
                                 "FAILED test_first.py::test_three_fails - AssertionError: *"])
    assert ("the shared sandbox (session scope) ended: the test body exited with status 3"
            in text)
    result.assert_outcomes(passed=4, failed=2, warnings=1)
    assert "one speaks" in text  # -rA shows the captured output
    # after the death, a new sandbox: the state of the first is gone, the second module
    # shares the new one
    assert re.findall(r"SEEN \[(.*)\]", result.stdout.str()) == ["'second'"]


def test_module_scope_a_sandbox_per_module(suite):
    suite.makepyfile(test_first=FIRST.replace("test_four_dies", "test_four_lives").replace(
        "os._exit(3)", "pass").replace("== []", "== ['one', 'two']"))
    result = run(suite, "--minictr-sandbox-tests", "--minictr-sandbox-scope=module", "-rA")
    result.stdout.fnmatch_lines(["minictr: sandbox scope: module *"])
    result.assert_outcomes(passed=5, failed=1, warnings=1)
    assert re.findall(r"SEEN \[(.*)\]", result.stdout.str()) == ["'second'"]


def test_the_marker_sets_a_modules_scope(pytester):
    pytester.makepyfile(test_marked="""
        import os, pytest
        pytestmark = pytest.mark.container(scope="module")
        PIDS = []

        def test_a():
            PIDS.append(os.getpid())

        def test_b():
            assert PIDS == [os.getpid()]
    """)
    run(pytester).assert_outcomes(passed=2)


def test_a_wrong_scope_is_named(pytester):
    pytester.makepyfile(test_wrong="""
        import pytest
        @pytest.mark.container(scope="class")
        def test_a():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*scope='class': expected 'test', 'module' or 'session'*"])
    assert "invalid choice: 'wide'" in run(pytester, "--minictr-sandbox-scope=wide").stderr.str()


def test_session_scope_under_xdist_with_junit_and_maxfail(suite):
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    result = run(suite, "--minictr-sandbox-tests", "--minictr-sandbox-scope", "session",
                 "-n", "2", "--junitxml=out.xml")
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 2 and outcomes["passed"] >= 2, outcomes
    xml = (suite.path / "out.xml").read_text()
    assert xml.count("<testcase ") == 6 and "the shared sandbox (session scope) ended" in xml
    stopped = run(suite, "--minictr-sandbox-tests", "--minictr-sandbox-scope", "session", "-x")
    stopped.assert_outcomes(passed=2, failed=1)


FORGE_SESSION = """
import json, os, pytest

def test_forges():
    line = json.dumps({"item": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                       "reports": [], "warnings": []}).encode()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(("pipe:", "socket:")):
                os.write(int(name), line + b"\\n")
        except OSError:
            pass
    assert False

def test_after():
    pass
"""


def test_a_forged_report_fails_at_session_scope(pytester):
    pytester.makepyfile(test_forge=FORGE_SESSION)
    result = run(pytester, "--minictr-sandbox-tests", "--minictr-sandbox-scope=session", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_forge.py::test_forges - *"])
    assert "the body wrote to its report channel" in result.stdout.str()


def test_a_sandbox_killed_at_its_timeout_fails_its_test_the_rest_go_on(pytester):
    pytester.makepyfile(test_slow="""
        import time
        def test_hangs():
            time.sleep(60)

        def test_next():
            pass
    """)
    result = run(pytester, "--minictr-sandbox-tests", "--minictr-sandbox-scope=session",
                 "--minictr-timeout=3")
    result.assert_outcomes(passed=1, failed=1)
    assert "timeout=3s: the test body was killed at its timeout" in result.stdout.str()


def test_worker_fixtures_stay_the_workers_between_shared_sandboxes(pytester):
    """A test using the `container` fixture runs in the worker (and sets up its session
    fixtures there); the next shared sandbox makes its own, and never ends the worker's."""
    pytester.makepyfile(test_mix="""
        import os, pytest

        @pytest.fixture(scope="session")
        def where():
            return os.getpid()

        def test_a(where):
            assert os.getpid() == where

        @pytest.mark.container(binaries=["echo"])
        def test_uses_container(container, where):
            assert container.run(["echo", "hi"]).stdout == b"hi\\n"

        def test_b(where):
            assert os.getpid() == where

        @pytest.mark.container(memory="128M")
        def test_other_limits(where):
            assert os.getpid() == where
    """)
    result = run(pytester, "--minictr-sandbox-tests", "--minictr-sandbox-scope=session",
                 "-W", "error::pytest.PytestUnraisableExceptionWarning")
    result.assert_outcomes(passed=4)


def test_tests_using_services_run_at_test_scope(pytester):
    """A body cannot start containers: a test that uses minictr_service (through a fixture
    here) has its fixtures in the worker, its body sandboxed; the others share a sandbox."""
    pytester.makepyfile(test_served="""
        import os, socket, pytest

        @pytest.fixture(scope="module")
        def web(minictr_service):
            return minictr_service(recipe="python3", ports=[8000], wait_for_port=8000,
                                   command=["python3", "-m", "http.server", "8000"])

        def test_served(web):
            socket.create_connection(web.address(8000), timeout=10).close()

        def test_shared():
            assert os.getpid() == 2
    """)
    result = run(pytester, "--minictr-sandbox-tests", "--minictr-sandbox-scope=session")
    result.assert_outcomes(passed=2)


def test_pytest_timeout_at_session_scope(pytester):
    pytester.makepyfile(test_slow="""
        import time, pytest
        @pytest.mark.timeout(2)
        def test_hangs():
            time.sleep(60)

        def test_next():
            pass
    """)
    result = run(pytester, "--minictr-sandbox-tests", "--minictr-sandbox-scope=session",
                 "-p", "timeout")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])


ROOTLESS = """
import os, pytest
pytestmark = pytest.mark.container(scope="session")
PIDS = []

def test_first(tmp_path):
    (tmp_path / "x").write_text("mine")
    PIDS.append(os.getpid())
    assert os.getuid() == 0 and open("/proc/self/uid_map").read().split()[1] == "{uid}"

def test_shares():
    assert PIDS == [os.getpid()]

def test_dies():
    os._exit(3)

def test_new_sandbox():
    assert PIDS == []
"""

account = account_fixture("mcts")


def test_session_scope_without_root(account):
    source = ROOTLESS.format(uid=account.uid)
    with place_with_tests(account, "minictr-scope-site-", source) as (runner, place, tests):
        done = runner("-m", "pytest", "-p", "pytest_minictr.plugin", "-p", "no:cacheprovider",
                      "-rA", f"--basetemp={place}/home/tmp", str(tests), cwd=tests)
        for name in ("first", "shares", "new_sandbox"):
            assert f"PASSED test_mine.py::test_{name}" in done.stdout, done.stdout[-3000:]
        assert "FAILED test_mine.py::test_dies" in done.stdout, done.stdout[-3000:]
