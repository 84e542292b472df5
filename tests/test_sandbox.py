"""Sandboxed test bodies (#16) as their users meet them: test files run by a real pytest in a
subprocess (pytester), whose bodies see, do and end as the README says."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.unprivileged import account_fixture, place_with_tests

pytest_plugins = ["pytester"]

INNER_TIMEOUT = 240  # seconds an inner session may take (they take a few)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args,
                                         timeout=INNER_TIMEOUT)


def launcher_groups(pid_file: Path) -> list[Path]:
    """The cgroups left by the launcher whose pid the inner session wrote to `pid_file`."""
    pid = pid_file.read_text().strip()
    return [group for parent in Path("/sys/fs/cgroup").glob("**/minictr")
            for group in parent.glob(f"minictr-{pid}@*")]


REMEMBER_LAUNCHER = """
def test_zz_remember_the_launcher(pytestconfig):
    from pytest_minictr.plugin import _BODY_RUNTIME
    runtime = pytestconfig.stash[_BODY_RUNTIME]
    open({path!r}, "w").write(str(runtime._client.pid))
"""


# --- 1, 2, 5: what the body sees, and what does not leak back ---------------------------------

VIEW = """
import os, socket, sys, pytest

HOST_USER_NS = os.stat("/proc/self/ns/user").st_ino
counter = 0

@pytest.fixture
def host_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()

@pytest.fixture
def shared_list():
    items = []
    yield items
    assert items == [], "the body's append reached the worker's fixture value"

@pytest.mark.container(hostname="box", env={"GREETING": "hi"})
def test_own_namespaces_and_view(tmp_path, host_server, shared_list):
    assert os.getpid() == 2 and sorted(p for p in os.listdir("/proc") if p.isdigit()) == ["1", "2"]
    assert os.stat("/proc/self/ns/user").st_ino != HOST_USER_NS
    assert socket.gethostname() == "box" and os.environ["GREETING"] == "hi"
    assert open("/proc/self/cgroup").read().split("\\n")[-2].endswith("::/")
    status = open("/proc/self/status").read()
    assert "NoNewPrivs:\\t1" in status and "Seccomp:\\t2" in status
    assert int(status.split("CapBnd:")[1].split()[0], 16) == 0x4fb  # the containers' default
    assert sorted(os.listdir("/dev")) == sorted(["shm", "pts", "ptmx", "stderr", "stdout", "stdin",
                                                 "fd", "tty", "urandom", "random", "full",
                                                 "zero", "null"])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host_server), timeout=5)
    (tmp_path / "written").write_text("kept")
    open("/tmp/private", "w").write("gone")
    with pytest.raises(OSError) as read_only:
        open(os.path.join(os.path.dirname(os.__file__), "minictr-was-here"), "w")
    assert read_only.value.errno == 30  # EROFS
    import json  # noqa: F401 - the host's standard library is readable
    shared_list.append("mutated inside")

@pytest.mark.container(network="none")
def test_network_none():
    with pytest.raises(OSError) as error:
        socket.create_connection(("127.0.0.1", 1), timeout=5)
    assert error.value.errno == 101  # ENETUNREACH: not even loopback

@pytest.mark.container(writable=[{writable!r}])
def test_writable_paths():
    open({writable!r} + "/out", "w").write("ok")

@pytest.mark.container
def test_changes_in_the_body(monkeypatch):
    global counter
    counter = 99
    os.environ["LEAKED"] = "1"
    os.chdir("/")
    monkeypatch.setattr(os, "sep", "!")
    sys.modules["leaked_module"] = sys
    import xml.dom.minidom  # noqa: F401

def test_nothing_came_back(tmp_path):
    assert counter == 0 and "LEAKED" not in os.environ and os.getcwd() != "/"
    assert os.sep == "/" and "leaked_module" not in sys.modules
    assert not os.path.exists("/tmp/private")

def test_zz_writes_landed():
    assert open({writable!r} + "/out").read() == "ok"
"""


def test_the_body_sees_the_host_read_only_in_its_own_namespaces(pytester):
    writable = tempfile.mkdtemp(prefix="minictr-writable-")
    try:
        pytester.makepyfile(VIEW.replace("{writable!r}", repr(writable))
                            + REMEMBER_LAUNCHER.format(path=str(pytester.path / "pid")))
        result = run(pytester)
        result.assert_outcomes(passed=7)
        assert os.listdir(writable) == ["out"]
        tmp_written = list(Path(pytester.path).glob("**/test_own_namespaces_and_view0/written"))
        assert [p.read_text() for p in tmp_written] == ["kept"]
        assert launcher_groups(pytester.path / "pid") == []
    finally:
        shutil.rmtree(writable)


def test_fixture_tests_keep_their_meaning_and_fixture_only_keywords_are_setup_errors(pytester):
    pytester.makepyfile("""
        import os, pytest
        @pytest.mark.container(binaries=["sh"])
        def test_fixture(container):
            assert os.getpid() != 2 and container.run("echo hi").stdout == b"hi\\n"

        @pytest.mark.container(recipe="minimal")
        def test_body_with_a_recipe():
            pass

        @pytest.mark.container(writable=["/"])
        def test_fixture_with_writable(container):
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.container: recipe= builds a rootfs for the `container` fixture*",
        "*@pytest.mark.container: writable=?'/'? is for a test body run sandboxed*"])


# --- 3: outcomes read exactly as in-process ---------------------------------------------------

OUTCOMES = """
import logging, sys, warnings, pytest

class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling")

def test_assert_rewritten():
    values = {"a": 1, "b": [1, 2, 3]}
    assert values == {"a": 1, "b": [1, 2, 4]}

def test_skip():
    pytest.skip("not today")

def test_xfail_call():
    pytest.xfail("known bug")

@pytest.mark.xfail(reason="marked", strict=True)
def test_xfail_marker():
    assert False

@pytest.mark.xfail(strict=True)
def test_xpass_strict():
    pass

def test_fail():
    pytest.fail("said so")

def test_unpicklable():
    raise Unpicklable("lambda inside", lambda: 1)

def test_output_log_and_warning():
    print("to stdout")
    print("to stderr", file=sys.stderr)
    logging.getLogger("inner").warning("a log record")
    warnings.warn("a warning from the body", DeprecationWarning)
    assert False

@pytest.mark.parametrize("n", [1, 2])
def test_param(n, record_property):
    record_property("n", n)
    assert n == 1

def test_sys_exit():
    sys.exit(3)
"""


def outcomes(result: pytest.RunResult) -> list[str]:
    """The per-test lines of -rA, and each failure's E lines, in order."""
    return [re.sub(r" at 0x[0-9a-f]+", "", line) for line in result.outlines
            if re.match(r"(PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR) ", line)
            or line.startswith("E ")]


@pytest.mark.parametrize("tb", ["auto", "short", "line"])
def test_outcomes_read_as_in_process(pytester, tb):
    pytester.makepyfile(OUTCOMES)
    plain = run(pytester, "-rA", f"--tb={tb}", "--junitxml=plain.xml")
    boxed = run(pytester, "-rA", f"--tb={tb}", "--minictr-sandbox-tests", "--junitxml=boxed.xml")
    assert outcomes(boxed) == outcomes(plain)
    assert boxed.parseoutcomes() == plain.parseoutcomes()
    assert "minictr: test bodies run sandboxed: all (--minictr-sandbox-tests)" \
        in boxed.stdout.str()
    if tb == "auto":
        boxed.stdout.fnmatch_lines_random(["*Captured stdout call*", "to stdout",
                                    "*Captured stderr call*", "to stderr",
                                    "*Captured log call*", "*a log record*",
                                    "*DeprecationWarning: a warning from the body*",
                                    "*Unpicklable: ('lambda inside', <function*"])
        xml = [(pytester.path / name).read_text() for name in ("plain.xml", "boxed.xml")]
        assert [x.count("<failure") for x in xml] == [x.count("<failure") for x in xml[:1]] * 2
        assert '<property name="n" value="1"' in xml[1]


def test_x_and_last_failed(pytester):
    pytester.makepyfile("""
        import pytest
        pytestmark = pytest.mark.container
        def test_a(): pass
        def test_b(): assert False
        def test_c(): pass
    """)
    first = pytester.runpytest_subprocess("-x", timeout=INNER_TIMEOUT)
    first.assert_outcomes(passed=1, failed=1)
    again = pytester.runpytest_subprocess("--lf", timeout=INNER_TIMEOUT)
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure*"])


def test_s_shows_the_body_output_live(pytester):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.container
        def test_loud():
            print("live from the body")
    """)
    result = run(pytester, "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*live from the body*"])


# --- 4: every abnormal end is one line, and nothing is left behind -----------------------------

ENDS = """
import os, signal, ctypes, sys, time, pytest

@pytest.mark.container(memory="64M")
def test_oom():
    data = bytearray(200 * 1024 * 1024)
    assert data

@pytest.mark.container(timeout=1)
def test_timeout():
    time.sleep(60)

@pytest.mark.container
def test_segfault():
    ctypes.string_at(0)

@pytest.mark.container
def test_sigkill():
    os.kill(os.getpid(), signal.SIGKILL)

@pytest.mark.container
def test_os_exit():
    os._exit(7)

@pytest.mark.container
def test_sys_exit():
    sys.exit(4)

@pytest.mark.container(pids=16, timeout=30)
def test_fork_bomb():
    while True:
        os.fork()

def test_the_session_goes_on():
    pass
"""


@pytest.mark.needs_limits
def test_every_abnormal_end_is_a_failed_test_with_one_line(pytester):
    pytester.makepyfile(ENDS + REMEMBER_LAUNCHER.format(path=str(pytester.path / "pid")))
    result = run(pytester, "-rA")
    result.assert_outcomes(passed=2, failed=7)
    result.stdout.fnmatch_lines_random([
        "memory=64M exceeded: killed by the OOM killer, peak 6*.* MiB",
        "timeout=1s: the test body was killed at its timeout",
        "the test body was killed by signal SIGSEGV (Segmentation fault)",
        "the test body was killed by signal SIGKILL (Killed)",
        "the test body exited with status 7 (os._exit?) before pytest could report it",
        "E       SystemExit: 4",
        "E           BlockingIOError: *",
        "pids=16 reached: * forks refused"])
    assert launcher_groups(pytester.path / "pid") == []


IN_TURN = """
import time, pytest

@pytest.mark.container(timeout=2)
@pytest.mark.parametrize("n", range(2))
def test_slow(n):
    time.sleep(1.5)

@pytest.mark.container(memory="64M")
@pytest.mark.parametrize("n", range(2))
def test_oom(n):
    assert bytearray(200 * 1024 * 1024)

@pytest.mark.container
def test_unlimited():
    assert bytearray(200 * 1024 * 1024)
"""


@pytest.mark.needs_limits
def test_each_body_has_its_own_limits_and_timeout_in_turn(pytester):
    """A body's sandbox is asked for while the body before it runs: its timeout still
    counts from its own start, its limits are its own, and none is left at the end."""
    pytester.makepyfile(IN_TURN + REMEMBER_LAUNCHER.format(path=str(pytester.path / "pid")))
    result = run(pytester, "-rA")
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines_random([
        "FAILED *test_oom[[]0[]]*memory=64M exceeded: killed by the OOM killer*",
        "FAILED *test_oom[[]1[]]*memory=64M exceeded: killed by the OOM killer*",
        "PASSED *test_unlimited*"])
    assert launcher_groups(pytester.path / "pid") == []


# --- 6, 7: whole suites, xdist, pytest-timeout, rootless ---------------------------------------

def test_sandbox_tests_from_the_environment_and_ini(pytester, monkeypatch):
    pytester.makepyfile("""
        import os
        def test_where():
            assert os.getpid() == 2
    """)
    monkeypatch.setenv("MINICTR_SANDBOX_TESTS", "1")
    run(pytester).assert_outcomes(passed=1)
    monkeypatch.delenv("MINICTR_SANDBOX_TESTS")
    run(pytester).assert_outcomes(failed=1)
    pytester.makeini("[pytest]\nminictr_sandbox_tests = true\n")
    run(pytester).assert_outcomes(passed=1)


def test_under_xdist_and_beside_pytest_timeout(pytester):
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile("""
        import os, time, pytest
        @pytest.mark.parametrize("n", range(6))
        def test_each(n, tmp_path):
            (tmp_path / "f").write_text(str(n))
            assert os.getpid() == 2

        @pytest.mark.timeout(2)
        def test_hangs():
            time.sleep(60)
    """)
    result = run(pytester, "-n", "2", "--minictr-sandbox-tests", "-p", "timeout")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])


ROOTLESS = """
import os, pytest

@pytest.mark.container
def test_rootless_body(tmp_path):
    assert os.getpid() == 2 and os.getuid() == 0
    assert open("/proc/self/uid_map").read().split() == ["0", str({uid}), "1"]
    (tmp_path / "x").write_text("mine")
    with pytest.raises(OSError):
        open("/etc/minictr-was-here", "w")

@pytest.mark.container(memory="64M")
def test_rootless_limit():
    pass
"""


account = account_fixture("mctr")


def test_rootless_bodies_for_a_real_account(account):
    source = textwrap.dedent(ROOTLESS.format(uid=account.uid))
    with place_with_tests(account, "minictr-sandbox-site-", source) as (runner, place, tests):
        done = runner("-m", "pytest", "-p", "pytest_minictr.plugin", "-p", "no:cacheprovider",
                      "-rA", f"--basetemp={place}/home/tmp", str(tests), cwd=tests)
        assert "PASSED test_mine.py::test_rootless_body" in done.stdout, done.stdout[-3000:]
        # limits without cgroups of its own: the --minictr-unavailable policy (fail by default)
        assert "PASSED test_mine.py::test_rootless_limit" in done.stdout \
            or "minictr cannot run containers here: resource limits need cgroups" \
            in done.stdout, done.stdout[-3000:]
