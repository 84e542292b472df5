"""`minictr` as a user types it: pass-through, exit statuses, errors on one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_minictr import RootfsBuilder

pytestmark = pytest.mark.usefixtures("no_leftovers")
REPO = Path(__file__).resolve().parent.parent


def minictr(*args: str, input: bytes | None = None, cache_dir=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cache_dir is not None:
        env["MINICTR_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "pytest_minictr", *args], input=input,
                          capture_output=True, env=env, timeout=60)


def test_run_passes_output_through_and_exits_with_the_status(cache_dir):
    done = minictr("run", "--bin", "echo", "--", "sh", "-c", "echo out; echo err >&2; exit 4",
                   cache_dir=cache_dir)
    assert (done.returncode, done.stdout, done.stderr) == (4, b"out\n", b"err\n")


def test_run_builds_a_rootfs_holding_the_command(cache_dir):
    done = minictr("run", "--hostname", "cli-box", "--", "hostname", cache_dir=cache_dir)
    assert (done.returncode, done.stdout) == (0, b"cli-box\n")


def test_stdin_is_passed_through(cache_dir):
    assert minictr("run", "--", "cat", input=b"piped", cache_dir=cache_dir).stdout == b"piped"


def test_death_by_signal_exits_128_plus_n(cache_dir):
    assert minictr("run", "--", "sh", "-c", "kill -KILL $$", cache_dir=cache_dir).returncode \
        == 128 + 9


def test_timeout_kills_and_says_so(cache_dir):
    done = minictr("run", "--timeout", "0.3", "--", "sleep", "30", cache_dir=cache_dir)
    assert done.returncode == 137 and b"timed out after 0.3 s" in done.stderr


@pytest.mark.needs_root  # --no-userns: host root in the container
def test_confinement_options(rootfs):
    done = minictr("run", "--rootfs", str(rootfs), "--ulimit", "nofile=70:80", "--cap-add",
                   "SYS_PTRACE", "--no-seccomp", "--no-userns", "--", "sh", "-c",
                   "ulimit -n; ulimit -Hn; cat /proc/self/status /proc/self/uid_map")
    lines = done.stdout.decode().splitlines()
    assert lines[:2] == ["70", "80"] and "CapEff:\t00000000000804fb" in lines
    assert "Seccomp:\t0" in lines and lines[-1].split() == ["0", "0", "4294967295"]


def test_env_and_rootfs_options(rootfs):
    done = minictr("run", "--rootfs", str(rootfs), "--env", "NAME=box", "--cwd", "/etc", "--",
                   "sh", "-c", 'echo "$NAME $PWD"')
    assert done.stdout == b"box /etc\n"


@pytest.mark.parametrize("args, status, message", [
    (["run", "--", "no-such-command-anywhere"], 127, b"not found on this host's PATH"),
    (["run", "--rootfs", "/no/such/dir", "--", "sh"], 125,
     b"--rootfs '/no/such/dir': does not exist (make one with `minictr rootfs build"),
    (["run", "--memory", "64Q", "--", "echo"], 125, b"unknown unit 'Q'"),
    (["run", "--cap-add", "ROOT", "--", "echo"], 125, b"'ROOT' is not a capability"),
    (["run", "--allow-syscall", "read", "--", "echo"], 125, b"'read' is not a call"),
    (["run", "--ulimit", "nofile=9:1", "--", "echo"], 125, b"soft limit exceeds the hard"),
])
def test_errors_are_one_line_with_a_status(args, status, message, cache_dir):
    done = minictr(*args, cache_dir=cache_dir)
    assert done.returncode == status
    assert done.stderr.startswith(b"minictr: error: ") and message in done.stderr
    assert done.stderr.count(b"\n") == 1 and b"Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--env", "NO-NAME", "--", "echo"], b"expected NAME=VALUE or NAME"),
    (["run", "--"], b"the command to run is missing"),
    (["run", "--cpus", "lots", "--", "echo"], b"--cpus='lots'"),
    (["run", "--network", "host", "--", "echo"], b"invalid choice: 'host'"),
    (["run", "--ulimit", "nofile", "--", "echo"], b"expected NAME=SOFT[:HARD]"),
    (["run", "--ulimit", "nofile=lots", "--", "echo"], b"expected NAME=SOFT[:HARD]"),
])
def test_usage_errors_are_one_line_and_125_as_in_docker(args, message, cache_dir):
    done = minictr(*args, cache_dir=cache_dir)
    assert done.returncode == 125 and message in done.stderr
    assert done.stderr.startswith(b"minictr: error: ") and done.stderr.count(b"\n") == 1


def test_rootfs_build_writes_a_directory(tmp_path):
    dest = tmp_path / "root"
    done = minictr("rootfs", "build", "--bin", "sh", str(dest))
    assert done.returncode == 0 and (dest / "bin").is_symlink()
    assert Path(done.stdout.decode().strip()) == dest


def test_main_in_process_gives_the_signal_handlers_back(rootfs, capfd, monkeypatch):
    """main() forwards Ctrl-C & co. to its container while it runs; called in-process (a test,
    a tool), it must leave the caller's handlers as they were (else a later Ctrl-C is lost)."""
    import signal

    from pytest_minictr.cli.main import FORWARDED, main
    before = {signum: signal.getsignal(signum) for signum in FORWARDED}
    with open(os.devnull) as stdin:  # pytest's own stdin has no file descriptor
        monkeypatch.setattr("sys.stdin", stdin)
        assert main(["run", "--rootfs", str(rootfs), "--", "true"]) == 0
    assert {signum: signal.getsignal(signum) for signum in FORWARDED} == before


def test_rootfs_list_sizes_are_disk_usage_and_its_columns_line_up(tmp_path):
    cache = tmp_path / "cache"
    for binaries in (["sh"], ["sh", "cat"]):
        RootfsBuilder(cache_dir=cache).build(binaries=binaries)
    first = sorted(entry for entry in cache.iterdir() if not entry.name.startswith("."))[0]
    first.rename(f"{first}.stale-0123abcd")  # as a rebuild leaves one: a longer key
    listed = json.loads(minictr("rootfs", "list", "--json", cache_dir=cache).stdout)
    for entry in listed:  # what `du -s` says the entry (its rootfs, its manifest) takes on disk
        entry_dir = os.path.dirname(entry["path"])
        du = subprocess.run(["du", "-s", "--block-size=1", entry_dir], capture_output=True,
                            text=True, check=True).stdout.split()[0]
        assert entry["size"] == int(du) > 0 and 0 <= entry["shared"] <= entry["size"]
    lines = minictr("rootfs", "list", cache_dir=cache).stdout.decode().splitlines()
    assert len(lines) == 3 and any(".stale-0123abcd" in line for line in lines)
    for column in ("RECIPE", "BINARIES"):  # words start under their header
        start = lines[0].index(column)
        assert all(line[start - 1] == " " != line[start] for line in lines[1:]), lines
    for column in ("SIZE", "SHARED", "AGE"):  # numbers end under theirs
        end = lines[0].index(column) + len(column)
        assert all(line[end - 1] != " " == line[end] for line in lines[1:]), lines
