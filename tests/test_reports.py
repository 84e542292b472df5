"""What a container's processes report to the launcher, as the launcher reads it, and the
null cgroup backend of a host without cgroups."""

from __future__ import annotations

import os
import signal

import pytest

from pytest_minictr.errors import UnsupportedError
from pytest_minictr.host.cgroups import NullBackend, group_name
from pytest_minictr.protocol import EndReport, SetupReport
from pytest_minictr.spec import Limits


def test_a_well_formed_end_report_gives_the_command_status_and_cpu_time():
    report = EndReport().adding(b'{"command": 256, "cpu_time": 0.5}')
    assert report.command_ended and report.returncode == 1 and report.cpu_time == 0.5


@pytest.mark.parametrize("line", [b'{"command": "0"}', b'{"command": true}',
                                  b'{"command": 0, "extra": 1}', b"[0]", b"not json"])
def test_a_line_with_an_unknown_key_or_a_wrong_type_is_dropped(line):
    assert EndReport().adding(line) == EndReport()


def test_without_the_init_report_the_keeper_or_our_own_wait_status_tells_the_end():
    killed = EndReport().with_child_status(signal.SIGKILL)  # a wait status: killed by SIGKILL
    assert killed.returncode == -signal.SIGKILL
    keeper = EndReport().adding(b'{"init": 15}').with_child_status(0)
    assert keeper.init_status == 15 and keeper.returncode == -15


def test_setup_report_keeps_the_last_pid_and_error():
    report = SetupReport.parse(b'{"pid": 7}\n{"error": {"type": "X", "message": "m"}}\n')
    assert report == SetupReport(7, {"type": "X", "message": "m"})


def test_null_backend_refuses_limits_with_its_reason_and_gives_empty_groups():
    backend = NullBackend("no cgroup filesystem is mounted")
    with pytest.raises(UnsupportedError, match="resource limits need cgroups: no cgroup"):
        backend.check_limits(Limits(pids=10))
    group = backend.create(group_name("1"), Limits())
    group.join(os.getpid())
    group.kill()
    group.discard()
    assert group.stats().cpu_time is None and group.stats().oom_killed is None
