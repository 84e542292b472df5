"""Resource limits and kernel measurements, seen as a user sees them. The same file runs on
this cgroup v1 host and on a pure cgroup v2 kernel (`ci/vm-tests`): the facts asserted are the
same on both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_minictr import ConfigError, ContainerRuntime
from tests.helpers import need_cgroups  # noqa: F401 - a module's autouse fixture

pytestmark = pytest.mark.usefixtures("no_leftovers")


def test_memory_hog_is_oom_killed(runtime, rootfs):
    # dash doubles the string each round: 32M is reached within a few dozen rounds
    result = runtime.run(rootfs, ["sh", "-c", 'a=x; while :; do a="$a$a"; done'],
                         memory_limit="32M", timeout=60).wait()
    assert result.oom_killed is True
    assert result.returncode == -signal.SIGKILL and not result.timed_out
    assert result.memory_peak is not None and result.memory_peak <= 33 * 1024**2


def test_memory_peak_and_cpu_time_are_measured(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); "
                                              "done"], memory_limit="64M").wait()
    assert result.returncode == 0 and result.oom_killed is False
    assert 0 < result.memory_peak <= 64 * 1024**2
    assert result.cpu_time > 0.01


def test_pids_limit_bounds_a_fork_flood(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", "for i in $(seq 60); do sleep 30 & echo $i; done"],
                         pids_limit=12, timeout=30).wait()
    started = [int(n) for n in result.stdout.split()]
    assert b"Cannot fork" in result.stderr and not result.timed_out
    assert 1 <= len(started) <= 11  # 12 minus the shell: the container's own init is extra


def test_cpu_limit_throttles_a_busy_loop(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", "while :; do :; done"], cpu_limit=25,
                         timeout=2).wait()
    assert result.timed_out
    assert 0.05 * result.wall_time <= result.cpu_time <= 0.3 * result.wall_time + 0.05


def test_limits_combine_with_plain_runs(runtime, rootfs):
    limited = runtime.run(rootfs, ["echo", "limited"], memory_limit="64M", pids_limit=16,
                          cpu_limit=50).wait()
    plain = runtime.run(rootfs, ["echo", "plain"]).wait()
    assert (limited.stdout, plain.stdout) == (b"limited\n", b"plain\n")


@pytest.mark.parametrize("kwargs, message", [
    ({"memory_limit": "32Q"}, "memory_limit='32Q': unknown unit 'Q'"),
    ({"pids_limit": -1}, "pids_limit=-1"),
    ({"cpu_limit": 0}, "cpu_limit=0"),
])
def test_bad_limits_are_config_errors(runtime, rootfs, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        runtime.run(rootfs, ["echo"], **kwargs)



CRASHING_CALLER = """
import sys, time
from pytest_minictr import ContainerRuntime
runtime = ContainerRuntime()
runtime.run(sys.argv[1], ["sleep", "300"], memory_limit="64M")
print(runtime._client.pid, flush=True)
time.sleep(300)
"""


def groups_owned_by(pid: int) -> list[Path]:
    return [*Path("/sys/fs/cgroup").glob(f"*/minictr/minictr-{pid}@*"),
            *Path("/sys/fs/cgroup/minictr").glob(f"minictr-{pid}@*")]


def test_groups_of_a_killed_launcher_are_reaped_by_the_next(rootfs):
    caller = subprocess.Popen([sys.executable, "-c", CRASHING_CALLER, str(rootfs)],
                              stdout=subprocess.PIPE, text=True)
    launcher = int(caller.stdout.readline())
    os.kill(launcher, signal.SIGKILL)  # the launcher first: it gets no chance to clean up
    caller.kill()
    caller.wait()
    caller.stdout.close()
    assert groups_owned_by(launcher), "a killed launcher leaves its groups"
    with ContainerRuntime() as runtime:  # starting a launcher reaps the groups of dead ones
        runtime.run(rootfs, ["true"]).wait()
    assert groups_owned_by(launcher) == []
