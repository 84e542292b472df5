"""The container life cycle through the library API: results, output, stdin, time limits,
stop, signals, errors, and nothing left behind on any path."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest

from pytest_minictr import (
    CommandNotFoundError,
    ConfigError,
    ContainerNotFoundError,
    ContainerProcessError,
    ContainerRuntime,
    ContainerSetupError,
    ContainerStatus,
    LauncherError,
    MinictrError,
    Result,
    RuntimeClosedError,
    UnsupportedError,
    WaitTimeoutError,
)

from .conftest import assert_nothing_left, host_snapshot, processes_with
from .helpers import eventually

pytestmark = pytest.mark.usefixtures("no_leftovers")


def sh(runtime, rootfs, script: str, **kwargs):
    return runtime.run(rootfs, ["sh", "-c", script], **kwargs)


def test_result_is_shaped_like_completed_process(runtime, rootfs):
    container = runtime.run(rootfs, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    result = container.wait()
    assert isinstance(result, Result)
    assert (result.args, result.returncode) == (("sh", "-c", "echo out; echo err >&2; exit 3"), 3)
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert not result.timed_out and not result.output_truncated
    assert result.wall_time > 0 and result.cpu_time is not None
    assert result.container_id == container.id
    with pytest.raises(ContainerProcessError) as raised:
        result.check_returncode()
    assert isinstance(raised.value, subprocess.CalledProcessError)
    assert raised.value.stderr == b"err\n"
    assert container.status == ContainerStatus.EXITED == "exited"


def test_killed_by_a_signal_gives_a_negative_returncode(runtime, rootfs):
    assert sh(runtime, rootfs, "kill -TERM $$").wait().returncode == -signal.SIGTERM


def test_large_output_on_both_streams_does_not_deadlock(runtime, rootfs):
    result = sh(runtime, rootfs, "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2; "
                                 "head -c 3000000 /dev/zero").wait()
    assert (len(result.stdout), len(result.stderr)) == (6_000_000, 3_000_000)


def test_output_beyond_the_limit_is_dropped_and_flagged(runtime, rootfs):
    result = sh(runtime, rootfs, "yes | head -c 5000000; echo done >&2",
                output_limit="1M").wait()
    assert len(result.stdout) == 1024 ** 2 and result.output_truncated
    assert result.returncode == 0 and result.stderr == b"done\n"


def test_input_is_fed_to_stdin(runtime, rootfs):
    data = os.urandom(1_000_000)
    assert runtime.run(rootfs, ["cat"], input=data).wait().stdout == data


def test_stdin_defaults_to_dev_null(runtime, rootfs):
    result = runtime.run(rootfs, ["cat"]).wait(timeout=10)
    assert (result.returncode, result.stdout) == (0, b"")


def test_input_the_command_does_not_read_is_dropped(runtime, rootfs):
    assert runtime.run(rootfs, ["echo", "x"],
                       input=b"y" * 10_000_000).wait().stdout == b"x\n"


def test_timeout_kills_the_whole_tree(runtime, rootfs):
    tag = f"{uuid.uuid4().int % 10**6}.5"
    container = sh(runtime, rootfs, f"sleep {tag} & sleep {tag}; echo never", timeout=0.5)
    result = container.wait()
    assert result.timed_out and result.returncode == -signal.SIGKILL
    assert 0.5 <= result.wall_time < 5
    assert container.status == ContainerStatus.TIMED_OUT
    assert result.stdout == b"" and processes_with(tag) == []


def test_detached_grandchild_dies_with_the_command(runtime, rootfs):
    tag = f"{uuid.uuid4().int % 10**6}.25"
    result = sh(runtime, rootfs, f"(setsid sleep {tag} </dev/null >/dev/null 2>&1 &); "
                                 f"(sleep {tag} &); echo started").wait()
    assert result.stdout == b"started\n"
    assert processes_with(tag) == []


def test_init_reaps_orphans(runtime, rootfs):
    out = sh(runtime, rootfs, "(sleep 0.05 &); (sleep 0.05 &); sleep 0.5; "
                              "cat /proc/[0-9]*/stat").wait().stdout.decode()
    states = [line[line.rindex(")") + 2] for line in out.splitlines()]
    assert "Z" not in states and len(states) >= 2


def test_stop_sends_sigterm_through_pid_1(runtime, rootfs):
    container = sh(runtime, rootfs, "trap 'echo got TERM; exit 7' TERM; "
                                    "echo ready; while :; do sleep 0.01; done")
    _wait_for_output(container)
    result = container.stop(grace=10)
    assert (result.returncode, result.stdout) == (7, b"ready\ngot TERM\n")
    assert container.status == ContainerStatus.STOPPED
    assert runtime.status(container.id) == "stopped"


def test_stop_kills_a_command_that_ignores_sigterm(runtime, rootfs):
    container = sh(runtime, rootfs, "trap '' TERM; echo ready; while :; do sleep 0.01; done")
    _wait_for_output(container)
    started = time.monotonic()
    result = runtime.stop(container.id, grace=0.3)
    assert result.returncode == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 5


def test_signals_are_forwarded_to_the_command(runtime, rootfs):
    container = sh(runtime, rootfs, "trap 'echo usr1; exit 0' USR1; echo ready; "
                                    "while :; do sleep 0.01; done")
    _wait_for_output(container)
    container.send_signal(signal.SIGUSR1)
    assert container.wait(timeout=10).stdout == b"ready\nusr1\n"


def test_status_list_and_unknown_ids(runtime, rootfs):
    container = runtime.run(rootfs, ["sleep", "30"])
    assert runtime.status(container.id) == ContainerStatus.RUNNING
    assert container in runtime.list()
    with pytest.raises(WaitTimeoutError):
        container.wait(timeout=0.1)
    assert container.status == "running"
    runtime.stop(container.id, grace=0)
    assert runtime.status(container.id) == ContainerStatus.STOPPED
    with pytest.raises(ContainerNotFoundError, match="nope"):
        runtime.status("nope")


def test_many_containers_at_once_from_threads(runtime, rootfs):
    results = {}

    def worker(n: int) -> None:
        results[n] = sh(runtime, rootfs, f"echo {n}; sleep 0.1").wait().stdout

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: f"{n}\n".encode() for n in range(8)}


@pytest.mark.parametrize("command, error", [
    (["nosuchcommand"], "'nosuchcommand' not found in the container"),
    (["/usr/bin/nosuch"], "'/usr/bin/nosuch' not found in the container's rootfs"),
    (["/etc/passwd"], "Permission denied"),
])
def test_missing_command_raises_before_anything_runs(runtime, rootfs, command, error):
    with pytest.raises(CommandNotFoundError, match=error):
        runtime.run(rootfs, command)


def test_setup_failure_carries_the_step_and_errno(runtime, rootfs):
    with pytest.raises(ContainerSetupError) as raised:
        runtime.run(rootfs, ["ls"], cwd="/no/such/dir")
    assert raised.value.step == "chdir to cwd='/no/such/dir'" and raised.value.errno == 2
    assert "No such file or directory" in str(raised.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"image": "/no/such/rootfs"}, "image='/no/such/rootfs': rootfs does not exist"),
    ({"memory_limit": "64Q"}, "memory_limit='64Q': unknown unit 'Q'"),
    ({"memory_limit": -1}, "memory_limit=-1: must be positive"),
    ({"pids_limit": 0}, "pids_limit=0: expected a positive integer"),
    ({"cpu_limit": -5}, "cpu_limit=-5"),
    ({"timeout": -1}, "timeout=-1: expected a positive number"),
    ({"command": []}, "command=\\[\\]: the command is empty"),
    ({"command": "echo hi"}, "expected a list of arguments"),
    ({"network": "host"}, "network='host': expected one of 'none', 'loopback'"),
    ({"env": {"A=B": "1"}}, "env name 'A=B'"),
    ({"input": "text"}, "expected bytes"),
    ({"hostname": "bad name"}, "hostname='bad name'"),
])
def test_bad_input_raises_config_error(runtime, rootfs, kwargs, message):
    arguments = {"image": rootfs, "command": ["echo"], **kwargs}
    with pytest.raises(ConfigError, match=message):
        runtime.run(**arguments)


def test_a_dead_launcher_is_reported_and_replaced(rootfs):
    before = host_snapshot()
    runtime = ContainerRuntime()
    tag = f"{uuid.uuid4().int % 10**6}.75"
    container = runtime.run(rootfs, ["sleep", tag])
    os.kill(runtime._client.pid, signal.SIGKILL)
    with pytest.raises(LauncherError, match="launcher died"):
        container.wait(timeout=10)
    assert eventually(lambda: processes_with(tag) == [])
    assert runtime.run(rootfs, ["echo", "again"]).wait().stdout == b"again\n"
    runtime.close()
    assert_nothing_left(before)


def test_interrupting_wait_kills_the_container(runtime, rootfs):
    tag = f"{uuid.uuid4().int % 10**6}.125"
    container = runtime.run(rootfs, ["sleep", tag])
    # a real SIGINT to the main thread, as Ctrl-C would send, interrupting the blocked poll()
    timer = threading.Timer(0.2, signal.pthread_kill, [threading.main_thread().ident,
                                                       signal.SIGINT])
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        container.wait()
    timer.join()
    assert processes_with(tag) == []
    assert container.status != ContainerStatus.RUNNING


def test_close_kills_what_still_runs(rootfs):
    before = host_snapshot()
    tag = f"{uuid.uuid4().int % 10**6}.375"
    with ContainerRuntime() as runtime:
        runtime.run(rootfs, ["sleep", tag])
        assert processes_with(tag)
    assert processes_with(tag) == []
    assert_nothing_left(before)


def test_a_closed_runtime_starts_nothing_and_leaves_nothing(rootfs):
    before = host_snapshot()
    runtime = ContainerRuntime()
    assert runtime.run(rootfs, ["true"]).wait().returncode == 0
    runtime.close()
    for start in (lambda: runtime.run(rootfs, ["true"]), runtime.pod, runtime.start):
        with pytest.raises(RuntimeClosedError, match="this ContainerRuntime is closed"):
            start()
    assert runtime._client.pid is None or not os.path.exists(f"/proc/{runtime._client.pid}")
    runtime.close()  # twice is fine
    assert_nothing_left(before)


def test_start_starts_the_one_launcher_ahead(rootfs):
    with ContainerRuntime() as runtime:
        runtime.start()
        assert runtime._client.pid is not None
        launcher = runtime._client.pid
        runtime.start()  # one launcher, started once
        assert runtime._client.pid == launcher
        assert runtime.run(rootfs, ["true"]).wait().returncode == 0
        assert runtime._client.pid == launcher


def test_every_error_is_a_minictr_error():
    for error in (ConfigError, CommandNotFoundError, ContainerNotFoundError, LauncherError,
                  RuntimeClosedError, UnsupportedError, WaitTimeoutError,
                  ContainerProcessError):
        assert issubclass(error, MinictrError)


def _wait_for_output(container, timeout: float = 10) -> None:
    """Until the command printed its first line (it has installed its traps by then)."""
    deadline = time.monotonic() + timeout
    while container._monitor is not None and not container._monitor.stdout \
            and time.monotonic() < deadline:
        try:
            container.wait(timeout=0.02)
        except WaitTimeoutError:
            pass


def test_stop_after_the_command_ended_reports_how_it_ended(runtime, rootfs):
    container = runtime.run(rootfs, ["true"])
    time.sleep(0.3)
    assert container.stop(grace=1).returncode == 0
    assert container.status == ContainerStatus.EXITED


def test_any_catchable_signal_reaches_the_command(runtime, rootfs):
    container = sh(runtime, rootfs, "trap 'exit 14' ALRM; echo ready; "
                                    "while :; do sleep 0.01; done")
    _wait_for_output(container)
    container.send_signal(signal.SIGALRM)
    assert container.wait(timeout=10).returncode == 14


@pytest.mark.parametrize("signum", [signal.SIGSTOP, signal.SIGCHLD, 0, 999, "TERM"])
def test_signals_that_cannot_be_passed_on_are_refused(runtime, rootfs, signum):
    container = runtime.run(rootfs, ["sleep", "30"])
    try:
        with pytest.raises(ConfigError, match="signal"):
            container.send_signal(signum)
    finally:
        container.kill()


@pytest.mark.parametrize("stdout", [987654, io.BytesIO(), "out.txt"])
def test_unusable_stdio_is_a_config_error(runtime, rootfs, stdout):
    with pytest.raises(ConfigError, match="stdout/stderr"):
        runtime.run(rootfs, ["echo"], stdout=stdout)


@pytest.mark.parametrize("grace", [-1, float("inf"), "x", None, 10**9])
def test_bad_grace_is_a_config_error(runtime, rootfs, grace):
    container = runtime.run(rootfs, ["sleep", "30"])
    try:
        with pytest.raises(ConfigError, match="grace"):
            container.stop(grace=grace)
    finally:
        container.kill()
