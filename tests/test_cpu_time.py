"""CPU-time limits and floods, as a grader sees them: the kernel's count of the container's CPU
decides the verdict, however loaded the machine is; a flood ends the moment it passes its
output limit. The same file runs on this cgroup v1 host and on a pure cgroup v2 kernel
(`ci/vm-tests`)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import pytest

from pytest_minictr import ConfigError
from tests.helpers import need_cgroups  # noqa: F401 - a module's autouse fixture

pytestmark = pytest.mark.usefixtures("no_leftovers")
pytest_plugins = ["pytester"]
BUSY = "while :; do :; done"
# the launcher looks at least every 5 ms; a loaded machine may wake it late
CPU_SLACK = 0.2


@contextlib.contextmanager
def busy_host_loops(count: int):
    """`count` busy loops on the host, beside the container, for as long as the block runs."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.2)  # running, not starting
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def assert_ended_at_its_cpu_limit(result, limit: float = 1.0) -> None:
    assert result.verdict == "cpu_time", result
    assert result.cpu_time_exceeded and not result.timed_out
    assert result.returncode == -signal.SIGKILL
    assert limit <= result.cpu_time <= limit + CPU_SLACK, result.cpu_time


def test_busy_loop_ends_at_its_cpu_time_limit(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", BUSY], cpu_time_limit=1, timeout=30).wait()
    assert_ended_at_its_cpu_limit(result)


def test_cpu_time_limit_holds_beside_two_busy_loops(runtime, rootfs):
    """On 2 CPUs shared with two busy loops the container gets a fraction of a CPU: its wall
    time grows, its CPU time at the end does not."""
    with busy_host_loops(2):
        result = runtime.run(rootfs, ["sh", "-c", BUSY], cpu_time_limit=1, timeout=60).wait()
    assert_ended_at_its_cpu_limit(result)


def test_every_process_of_the_container_counts(runtime, rootfs):
    # three busy processes: RLIMIT_CPU, one process at a time, would let them use 3 s or more
    result = runtime.run(rootfs, ["sh", "-c", f"({BUSY}) & ({BUSY}) & {BUSY}"],
                         cpu_time_limit=1, timeout=30).wait()
    assert_ended_at_its_cpu_limit(result)


def test_sleeping_program_is_ended_by_its_wall_timeout(runtime, rootfs):
    result = runtime.run(rootfs, ["sleep", "30"], cpu_time_limit=1, timeout=0.5).wait()
    assert result.verdict == "timeout"
    assert result.timed_out and not result.cpu_time_exceeded


def test_a_program_within_its_cpu_limit_is_ok(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", "echo hi"], cpu_time_limit=0.5).wait()
    assert result.verdict == "ok" and result.stdout == b"hi\n"
    assert result.cpu_time is not None and result.cpu_time < 0.5


def test_cpu_rlimit_is_a_cpu_time_verdict(runtime, rootfs):
    """RLIMIT_CPU given by hand: SIGKILL at the hard limit (soft = hard)..."""
    result = runtime.run(rootfs, ["sh", "-c", BUSY], rlimits={"cpu": 1}, timeout=30).wait()
    assert result.verdict == "cpu_time", result
    assert result.returncode == -signal.SIGKILL


def test_cpu_rlimit_soft_limit_is_a_cpu_time_verdict(runtime, rootfs):
    """... or SIGXCPU at the soft one."""
    result = runtime.run(rootfs, ["sh", "-c", BUSY], rlimits={"cpu": (1, 3)}, timeout=30).wait()
    assert result.verdict == "cpu_time", result
    assert result.returncode == -signal.SIGXCPU


def test_other_sigkill_is_still_a_signal(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", "kill -KILL $$"], rlimits={"cpu": 5}).wait()
    assert result.verdict == "signal"


def test_cpu_time_limit_sets_the_rlimit_backstop(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", "ulimit -t"], cpu_time_limit=1.5).wait()
    assert result.stdout == b"3\n"   # ceil(1.5) + 1: the launcher's kill comes first


@pytest.mark.parametrize("value", [0, -1, "1s", True])
def test_bad_cpu_time_limit_is_refused(runtime, rootfs, value):
    with pytest.raises(ConfigError, match="cpu_time_limit"):
        runtime.run(rootfs, ["true"], cpu_time_limit=value)


def test_flood_with_kill_on_output_limit_ends_at_once(runtime, rootfs):
    began = time.monotonic()
    result = runtime.run(rootfs, ["yes"], output_limit="1M", timeout=10,
                         kill_on_output_limit=True).wait()
    assert time.monotonic() - began < 1
    assert result.verdict == "output_limit"
    assert len(result.stdout) == 1024 ** 2 and result.returncode == -signal.SIGKILL


def test_flood_runs_on_by_default_with_its_output_dropped(runtime, rootfs):
    # subprocess's and Docker's habit: the program goes on; only what is kept is bounded
    result = runtime.run(rootfs, ["sh", "-c", "yes | head -c 2000000; echo done >&2"],
                         output_limit="1M", timeout=10).wait()
    assert result.returncode == 0 and result.stderr == b"done\n"
    assert result.output_truncated and result.verdict == "output_limit"


MARKED = """
import pytest

@pytest.mark.container(cpu_time=1, timeout=30)
def test_fixture_container(container):
    result = container.run("while :; do :; done")
    assert result.verdict == "cpu_time" and 1 <= result.cpu_time <= 1.2

@pytest.mark.container(cpu_time=1)
def test_sandboxed_body():
    pass
"""


def test_the_marker_limits_a_containers_cpu_time_and_a_body_refuses_it(pytester):
    pytester.makepyfile(MARKED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE", timeout=120)
    result.assert_outcomes(passed=1, errors=1)  # at setup, as any wrong marker value
    result.stdout.fnmatch_lines(["*ERROR at setup of test_sandboxed_body*",
                                 "*cpu_time=1: a CPU-time limit is kept for a container's "
                                 "command, not for a sandboxed test body*"])
    assert "Traceback" not in result.stdout.str()
