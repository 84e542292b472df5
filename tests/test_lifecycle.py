"""Detached containers across processes: `minictr run -d`, then ps, logs, exec, stats, stop,
kill, rm, each a separate process, as a user types them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_minictr.cli.detached.records import Record, Store

from .helpers import eventually, process_gone

REPO = Path(__file__).resolve().parent.parent
BINARIES = ["--bin", "sleep", "--bin", "cat", "--bin", "hostname"]


@pytest.fixture
def minictr(tmp_path, monkeypatch):
    """minictr(*args) -> CompletedProcess, with a state directory of the test's own; every
    container still running at the end is killed and removed."""
    state = tmp_path / "state"
    monkeypatch.setenv("MINICTR_STATE_DIR", str(state))

    def run(*args: str, timeout: float = 60, input: bytes | None = None):
        return subprocess.run([sys.executable, "-m", "pytest_minictr", *args], input=input,
                              capture_output=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    yield run
    for record in Store(state).all():
        run("rm", "--force", record.id)
    assert not any(Store(state).all())


def start(minictr, *command: str, options: tuple[str, ...] = ()) -> str:
    done = minictr("run", "-d", *BINARIES, *options, "--", *command)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def record(container_id: str) -> Record:
    return Store().read(container_id)


def test_a_detached_container_outlives_its_cli_and_is_reached_by_others(minictr):
    started = time.monotonic()
    cid = start(minictr, "sh", "-c", "echo out; echo err >&2; echo kept > /tmp/f; sleep 60",
                options=("--hostname", "svc"))
    assert time.monotonic() - started < 30 and len(cid) == 12
    listed = json.loads(minictr("ps", "--json").stdout)
    assert [record["id"] for record in listed] == [cid]
    listed_record = listed[0]
    assert listed_record["status"] == "running" and listed_record["options"]["hostname"] == "svc"
    assert listed_record["logs"][0].endswith(f"{cid}/stdout.log")
    assert listed_record["image"] == "host binaries"  # as `ps` names what it runs on
    header, row = minictr("ps").stdout.decode().splitlines()[:2]
    assert header.split()[:4] == ["ID", "NAME", "IMAGE", "STATUS"]
    assert row.split()[:5] == [cid, "-", "host", "binaries", "running"]
    assert eventually(lambda: minictr("logs", cid).stdout == b"out\n")
    assert minictr("logs", cid).stderr == b"err\n"
    execd = minictr("exec", cid, "--", "sh", "-c", "hostname; cat /tmp/f; cat; exit 3",
                    input=b"piped\n")
    assert (execd.returncode, execd.stdout) == (3, b"svc\nkept\npiped\n")
    stats = json.loads(minictr("stats", "--json", cid).stdout)
    assert stats["processes"] == 2 or os.geteuid() != 0


def test_stop_ends_the_whole_tree_and_rm_removes_the_record(minictr):
    cid = start(minictr, "sh", "-c", "sleep 60 & sleep 60")
    running = record(cid)
    assert minictr("stop", "--time", "0.5", cid).returncode == 0
    ended = record(cid)
    assert (ended.status, ended.returncode) == ("stopped", -15) or ended.returncode == -9
    # the end is reported when the command and its tree are dead; the init exits just after
    assert eventually(lambda: process_gone(running.init_pid) and process_gone(running.shim_pid))
    table = minictr("ps", "--all").stdout.decode()
    assert cid in table and "stopped" in table and cid not in minictr("ps").stdout.decode()
    assert minictr("rm", cid).returncode == 0
    assert cid not in minictr("ps", "--all").stdout.decode()


def test_kill_sends_a_signal_by_name(minictr):
    cid = start(minictr, "sleep", "60")
    assert minictr("kill", cid, "TERM").returncode == 0
    assert eventually(lambda: not record(cid).alive)
    assert record(cid).returncode == -signal.SIGTERM


def test_a_killed_shim_leaves_a_stale_record_that_ps_shows_and_prunes(minictr):
    cid = start(minictr, "sleep", "60")
    running = record(cid)
    os.kill(running.shim_pid, signal.SIGKILL)
    assert eventually(lambda: process_gone(running.init_pid))  # the container went with its shim
    assert "exited (shim gone)" in minictr("ps", "--all").stdout.decode()
    assert minictr("ps", "--prune").returncode == 0
    assert cid not in minictr("ps", "--all").stdout.decode()


def test_a_recycled_pid_is_not_taken_for_the_shim():
    alive = Record(id="0" * 12, command=("x",), created=0, shim_pid=os.getpid(),
                   shim_started=0, status="running")
    assert not alive.alive and alive.shown_status == "exited (shim gone)"


@pytest.mark.parametrize("args, message", [
    (["logs", "0123456789ab"], b"no container '0123456789ab'"),
    (["stop", "nonsense"], b"no container 'nonsense'"),
    (["exec", "0123456789ab", "--", "true"], b"no container '0123456789ab'"),
    (["kill", "0123456789ab", "NOPE"], b"signal 'NOPE'"),
])
def test_bad_input_is_one_line_and_status_125(minictr, args, message):
    done = minictr(*args)
    assert done.returncode == 125, done
    assert done.stderr.startswith(b"minictr: error: ") and message in done.stderr
    assert done.stderr.count(b"\n") == 1


def test_exec_into_an_ended_container_and_rm_of_a_running_one_are_refused(minictr):
    cid = start(minictr, "sleep", "60")
    refused = minictr("rm", cid)
    assert refused.returncode == 125 and b"is running: `minictr stop` it first" in refused.stderr
    minictr("stop", "--time", "0", cid)
    late = minictr("exec", cid, "--", "true")
    assert late.returncode == 125 and b"is not running: stopped (137)" in late.stderr


def test_two_execs_at_once_and_stop_racing_the_end(minictr):
    # The command outlives both execs however slow their start (each is a `minictr exec`
    # process: under CI load a second or more), then ends by itself a moment later.
    cid = start(minictr, "sh", "-c", "until [ -e /exec-0 ] && [ -e /exec-1 ]; "
                                     "do sleep 0.05; done; sleep 0.6")
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(
        minictr("exec", cid, "--", "sh", "-c", f"sleep 0.3; echo done; : > /exec-{n}")))
        for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.stdout for r in results] == [b"done\n", b"done\n"]
    time.sleep(0.6)  # about when the command ends by itself
    stop = minictr("stop", "--time", "0", cid)
    assert stop.returncode in (0, 125)
    assert eventually(lambda: not record(cid).alive)
    assert record(cid).status in ("exited", "stopped")
