"""Detached containers as Docker users handle them: --name wherever an id goes, `run -d --rm`,
`logs -f/--tail/--timestamps`, `wait`, `inspect`, quiet `stop`/`kill` of an ended container,
`rm -f` of a running one, `ps` showing `exited (137)`, `exec` options after the id, and exec's
exit codes and end lines as `run`'s."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from pytest_minictr.cli.detached.records import Record, Store, state_dir

from . import test_lifecycle
from .helpers import eventually
from .test_lifecycle import start

minictr = test_lifecycle.minictr  # the fixture: a state directory of the test's own


def test_a_name_is_usable_wherever_an_id_is_and_is_unique(minictr):
    cid = start(minictr, "sh", "-c", "echo hi; sleep 60", options=("--name", "web"))
    taken = minictr("run", "-d", "--name", "web", "--", "true")
    assert taken.returncode == 125 and b"--name 'web': already names container" in taken.stderr
    assert eventually(lambda: minictr("logs", "web").stdout == b"hi\n")
    assert minictr("exec", "web", "--", "echo", "in").stdout == b"in\n"
    assert json.loads(minictr("inspect", "web").stdout)[0]["id"] == cid
    assert b"web" in minictr("ps").stdout
    assert minictr("kill", "web").returncode == 0
    assert minictr("wait", "web").stdout == b"137\n"
    assert b"exited (137)" in minictr("ps", "-a").stdout or \
        b"stopped (137)" in minictr("ps", "-a").stdout
    assert minictr("rm", "web").returncode == 0
    assert minictr("logs", "web").returncode == 125
    reused = start(minictr, "true", options=("--name", "web"))  # rm freed the name
    assert reused != cid


def test_stop_and_kill_of_an_ended_container_succeed_quietly(minictr):
    cid = start(minictr, "sh", "-c", "exit 3")
    assert minictr("wait", cid).stdout == b"3\n"
    for args in (["stop", cid], ["kill", cid], ["kill", cid, "TERM"]):
        done = minictr(*args)
        assert (done.returncode, done.stderr) == (0, b""), args
    assert b"exited (3)" in minictr("ps", "-a").stdout


def test_rm_force_of_a_running_container_stops_it_first(minictr):
    cid = start(minictr, "sleep", "60", options=("--name", "long"))
    assert minictr("rm", "-f", "long").returncode == 0
    assert not (Store().root / cid).exists() and minictr("ps", "-a").stdout.count(b"\n") == 1


def test_run_d_rm_leaves_no_record(minictr):
    cid = start(minictr, "true", options=("--rm", "--name", "gone"))
    assert eventually(lambda: not (Store().root / cid).exists())
    assert minictr("inspect", "gone").returncode == 125


def test_logs_tail_timestamps_and_follow(minictr):
    cid = start(minictr, "sh", "-c", "echo 1; echo 2; echo 3; "
                "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo 4; echo err >&2")
    assert eventually(lambda: minictr("logs", cid).stdout == b"1\n2\n3\n")
    assert minictr("logs", "--tail", "2", cid).stdout == b"2\n3\n"
    assert minictr("logs", "--tail", "0", cid).stdout == b""
    stamped = minictr("logs", "--timestamps", cid).stdout.decode().splitlines()
    when, text = stamped[0].split(" ")
    moment = datetime.datetime.strptime(when, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert text == "1" and abs(moment.replace(tzinfo=datetime.timezone.utc).timestamp()
                               - time.time()) < 120
    following = subprocess.Popen([sys.executable, "-m", "pytest_minictr", "logs", "-f", cid],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert following.stdout.read(6) == b"1\n2\n3\n"  # printed while it still runs
        assert minictr("exec", cid, "--", "touch", "/tmp/go").returncode == 0
        out, err = following.communicate(timeout=30)  # returns once the container has ended
    finally:
        following.kill()
        following.wait()
    assert (out, err) == (b"4\n", b"err\n")
    assert minictr("logs", "--tail", "x", cid).returncode == 125


def test_inspect_is_json_with_the_state(minictr):
    cid = start(minictr, "sh", "-c", "exit 7", options=("--name", "seven"))
    minictr("wait", cid)
    record = json.loads(minictr("inspect", cid).stdout)[0]
    assert record["name"] == "seven" and record["state"] == {
        "status": "exited (7)", "running": False, "exit_code": 7}
    missing = minictr("inspect", "nobody")
    assert missing.returncode == 125 and b"no container 'nobody'" in missing.stderr


def test_exec_options_after_the_id_work_or_are_refused(minictr):
    cid = start(minictr, "sleep", "60")
    after = minictr("exec", cid, "--env", "X=after", "-e", "Y=too", "--", "sh", "-c",
                    'echo "$X $Y"')
    assert (after.returncode, after.stdout) == (0, b"after too\n"), after.stderr
    before = minictr("exec", "--env", "X=before", cid, "--", "sh", "-c", 'echo "$X"')
    assert before.stdout == b"before\n"
    refused = minictr("exec", cid, "--env", "X=1", "sh")
    assert refused.returncode == 125 and b"option '--env' after the container" in refused.stderr
    plain = minictr("exec", cid, "sh", "-c", "echo -n plain")  # no `--`: all of it the command
    assert plain.stdout == b"plain"


def test_exec_exit_codes_and_end_lines_are_runs(minictr):
    cid = start(minictr, "sleep", "60")
    missing = minictr("exec", cid, "--", "nosuch")
    assert missing.returncode == 127 and b"not found in the container" in missing.stderr
    minictr("exec", cid, "--", "sh", "-c", "echo data > /tmp/plain")
    not_executable = minictr("exec", cid, "--", "/tmp/plain")
    assert not_executable.returncode == 126, not_executable.stderr
    timed = minictr("exec", "--timeout", "0.3", cid, "--", "sleep", "5")
    assert timed.returncode == 137 and timed.stderr == b"minictr: timed out after 0.3 s (killed)\n"
    signalled = minictr("exec", cid, "--", "sh", "-c", "kill -TERM $$")
    assert signalled.returncode == 143
    assert signalled.stderr == b"minictr: the command was killed by SIGTERM\n"
    bad = minictr("exec", "--timeout", "-1", cid, "--", "true")
    assert bad.returncode == 125 and bad.stderr.count(b"\n") == 1


@pytest.mark.parametrize("args, message", [
    (["wait", "0123456789ab"], b"no container '0123456789ab'"),
    (["inspect", "../x"], b"no container '../x'"),
    (["logs", "-f", "nobody"], b"no container 'nobody'"),
    (["exec", "-t", "nobody", "--", "sh"], b"no container 'nobody'"),
    (["stop", "--time", "-1", "x"], b"--time -1: expected 0 or more seconds"),
])
def test_bad_input_to_the_new_commands_is_one_line_and_125(minictr, args, message):
    done = minictr(*args)
    assert done.returncode == 125 and message in done.stderr, done.stderr
    assert done.stderr.count(b"\n") == 1


def test_ps_q_lists_ids_and_ps_json_is_one_array(minictr):
    assert json.loads(minictr("ps", "--json").stdout) == []
    running = start(minictr, "sleep", "60")
    ended = start(minictr, "true", options=("--name", "a-name-longer-than-its-column-was"))
    minictr("wait", ended)
    table = minictr("ps", "-a").stdout.decode().splitlines()
    status = table[0].index("STATUS")  # the columns line up whatever the names hold
    assert [line[status:].split()[0] for line in table] == ["STATUS", "running", "exited"]
    assert minictr("ps", "-q").stdout == f"{running}\n".encode()
    assert sorted(minictr("ps", "-aq").stdout.split()) == sorted([running.encode(),
                                                                  ended.encode()])
    listed = json.loads(minictr("ps", "-a", "--json").stdout)
    assert [(r["id"], r["status"]) for r in listed] == [(running, "running"),
                                                        (ended, "exited (0)")]


def test_an_unambiguous_id_prefix_works_wherever_an_id_does(minictr):
    cid = start(minictr, "sh", "-c", "echo hi; sleep 60")
    prefix = cid[:3]
    assert eventually(lambda: minictr("logs", prefix).stdout == b"hi\n")
    assert minictr("exec", prefix, "--", "echo", "in").stdout == b"in\n"
    assert json.loads(minictr("inspect", prefix).stdout)[0]["id"] == cid
    assert json.loads(minictr("stats", "--json", prefix).stdout)["limits"] is not None
    assert minictr("stop", "--time", "0", prefix).returncode == 0
    assert minictr("wait", prefix).stdout == b"137\n"
    assert minictr("rm", prefix).returncode == 0 and not (Store().root / cid).exists()


def test_an_ambiguous_prefix_is_an_error_naming_the_candidates(minictr):
    store = Store()
    for cid in ("abc000000001", "abc000000002"):
        store.create(Record(id=cid, command=("true",), created=time.time(), status="exited",
                            returncode=0))
    for args in (["inspect", "abc"], ["rm", "abc0000000"], ["logs", "ab"]):
        done = minictr(*args)
        assert done.returncode == 125 and done.stderr == (
            f"minictr: error: {args[-1]!r} names more than one container: abc000000001, "
            "abc000000002 (give more of the id)\n").encode(), done.stderr
    assert minictr("rm", "abc000000002").returncode == 0
    assert json.loads(minictr("inspect", "abc").stdout)[0]["id"] == "abc000000001"
    named = start(minictr, "true", options=("--name", "abc"))  # a name beats a prefix
    assert json.loads(minictr("inspect", "abc").stdout)[0]["id"] == named
    assert minictr("inspect", "").returncode == 125


def test_stats_prints_the_limits_as_text(minictr):
    cid = start(minictr, "sleep", "60", options=("--memory", "64M", "--pids", "32"))
    shown = minictr("stats", cid)
    assert shown.returncode == 0 and b"{" not in shown.stdout, shown.stdout
    assert b"limits: memory 64M, cpus unlimited, pids 32\n" in shown.stdout


def into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """minictr with its stdout a pipe nobody reads any more (`| head -1` once head is gone)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb") as stdout:
        return subprocess.run([sys.executable, "-m", "pytest_minictr", *args], stdout=stdout,
                              stderr=subprocess.PIPE, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(test_lifecycle.REPO)})


def test_a_reader_that_went_away_ends_every_command_quietly(minictr):
    cid = start(minictr, "sh", "-c", "echo out; sleep 60", options=("--name", "piped"))
    assert eventually(lambda: minictr("logs", cid).stdout == b"out\n")
    for args in (["ps"], ["ps", "-a", "--json"], ["inspect", "piped"], ["logs", cid],
                 ["logs", "-f", cid], ["stats", cid], ["rootfs", "list"]):
        done = into_a_closed_pipe(*args)
        assert (done.returncode, done.stderr) == (141, b""), args
    assert into_a_closed_pipe("--help").stderr == b""  # (argparse ignores the error: 0)


def test_a_named_foreground_container_is_reached_from_another_shell(minictr):
    foreground = subprocess.Popen(
        [sys.executable, "-m", "pytest_minictr", "run", *test_lifecycle.BINARIES, "--name",
         "fg", "--", "sh", "-c", "echo started; sleep 60"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(test_lifecycle.REPO)})
    try:
        assert foreground.stdout.readline() == b"started\n"  # to our terminal, not to logs
        assert eventually(lambda: [(r["name"], r["status"]) for r in json.loads(
            minictr("ps", "--json").stdout)] == [("fg", "running")])
        assert minictr("exec", "fg", "--", "echo", "beside").stdout == b"beside\n"
        assert json.loads(minictr("inspect", "fg").stdout)[0]["state"]["running"] is True
        logs = minictr("logs", "fg")
        assert logs.returncode == 125 and b"ran in the foreground" in logs.stderr
        assert minictr("stop", "--time", "0.5", "fg").returncode == 0
        _, err = foreground.communicate(timeout=30)
    finally:
        foreground.kill()
        foreground.wait()
    assert (foreground.returncode, err) == (143, b"")  # a stop asked for: no end line
    assert json.loads(minictr("ps", "-a", "--json").stdout)[0]["status"] == "stopped (143)"
    assert minictr("rm", "fg").returncode == 0


def test_a_foreground_rm_leaves_no_record_and_a_name_without_it_stays(minictr):
    done = minictr("run", "--rm", "--name", "once", "--", "sh", "-c", "exit 3")
    assert (done.returncode, done.stderr) == (3, b"") and Store().ids() == []
    assert minictr("run", "--rm", "--", "true").returncode == 0
    assert minictr("run", "--name", "kept", "--", "true").returncode == 0
    listed = json.loads(minictr("ps", "-a", "--json").stdout)
    assert [(r["name"], r["status"]) for r in listed] == [("kept", "exited (0)")]
    taken = minictr("run", "--name", "kept", "--", "true")
    assert taken.returncode == 125 and b"--name 'kept': already names container" in taken.stderr


def test_exec_in_a_user_container_runs_as_its_user(minictr):
    cid = start(minictr, "sleep", "60", options=("-u", "1000:1000"))
    assert minictr("exec", cid, "--", "id", "-u").stdout == b"1000\n"


def test_a_state_directory_someone_else_made_is_refused(minictr, tmp_path, monkeypatch):
    """Without XDG_RUNTIME_DIR an ordinary user's records live in /tmp/minictr-UID, a name
    anyone may take first."""
    squatted = tmp_path / "squatted"
    squatted.mkdir(mode=0o755)
    os.chown(squatted, 12345, 12345)
    monkeypatch.setenv("MINICTR_STATE_DIR", str(squatted))
    for args in (["ps"], ["run", "-d", "--", "true"]):
        done = minictr(*args)
        assert done.returncode == 125 and done.stderr == (
            f"minictr: error: state directory {squatted}: not a directory of yours that only "
            "you may write (uid 12345, drwxr-xr-x); remove it, or set XDG_RUNTIME_DIR or "
            "MINICTR_STATE_DIR to one\n").encode(), done.stderr
    monkeypatch.setenv("MINICTR_STATE_DIR", str(tmp_path / "state"))  # for the teardown


def test_without_xdg_runtime_dir_records_go_to_the_temp_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MINICTR_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert state_dir() == tmp_path / "minictr-1000"
