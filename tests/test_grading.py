"""Grading untrusted snippets: honest and hostile Python snippets in the python3 recipe under
tight limits, each with the right verdict, and the host untouched (checked from outside)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from pytest_minictr import ContainerRuntime, RootfsBuilder

pytestmark = pytest.mark.usefixtures("no_leftovers")
REPO = Path(__file__).resolve().parent.parent
LIMITS = {"memory_limit": "64M", "pids_limit": 32, "cpu_limit": 100, "timeout": 5,
          "output_limit": "1M", "layer_size": "16M"}


@pytest.fixture(scope="module")
def python_rootfs(tmp_path_factory):
    return RootfsBuilder(cache_dir=tmp_path_factory.mktemp("cache")).build(recipe="python3")


@pytest.fixture
def grade(runtime, python_rootfs):
    if os.geteuid() != 0:
        pytest.skip("the limits of grading need cgroups (root, or a delegated cgroup v2)")

    def run(snippet: str, **overrides):
        code = textwrap.dedent(snippet)
        return runtime.run(python_rootfs, ["python3", "-c", code],
                           **{**LIMITS, **overrides}).wait()
    return run


def test_honest_snippets_get_ok_and_runtime_error(grade):
    assert grade("print(sum(range(10)))").verdict == "ok"
    failed = grade("raise SystemExit(3)")
    assert (failed.verdict, failed.returncode) == ("runtime_error", 3)
    crashed = grade("1/0")
    assert crashed.verdict == "runtime_error" and b"ZeroDivisionError" in crashed.stderr


def test_the_standard_library_imports(grade):
    result = grade("import json, re, sqlite3, ssl, ctypes, subprocess, multiprocessing, "
                   "decimal, zlib, hashlib, threading; print('ok')")
    assert (result.verdict, result.stdout) == ("ok", b"ok\n"), result.stderr


def test_memory_hog(grade):
    result = grade("x = bytearray(512 * 1024 * 1024)")
    assert result.verdict in ("memory", "runtime_error")  # MemoryError may come first
    assert result.oom_killed or b"MemoryError" in result.stderr
    hog = grade("""
        blocks = []
        while True:
            blocks.append(bytearray(8 * 1024 * 1024))
    """)
    assert hog.verdict in ("memory", "runtime_error")
    assert hog.memory_peak <= 66 * 1024**2


def test_busy_loop_times_out_within_its_cpu_share(grade):
    result = grade("while True: pass", timeout=1, cpu_limit=50)
    assert result.verdict == "timeout" and result.returncode == -9
    assert result.cpu_time <= 0.5 * result.wall_time + 0.3


def test_fork_flood_is_bounded_and_graded(grade):
    result = grade("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, timeout=2)
    assert result.verdict == "timeout"  # the flood spins at its pids limit until its time


def test_output_flood_is_truncated_and_the_caller_stays_small(grade):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = grade("import sys\nwhile True: sys.stdout.write('x' * 65536)", timeout=3)
    assert result.verdict == "output_limit" and len(result.stdout) == 1024**2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


def test_network_to_a_host_listener_fails(grade):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        result = grade(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("connected")
            except OSError as error:
                print("refused", error.errno)
        """)
        assert result.stdout.startswith(b"refused")
        with pytest.raises(socket.timeout):
            listener.accept()


def test_host_files_are_absent(grade):
    marker = Path("/") / f"minictr-grading-{uuid.uuid4().hex}"
    marker.write_text("secret")
    try:
        result = grade(f"""
            import os
            print(os.path.exists({str(marker)!r}), os.path.exists("/work"),
                  os.path.exists("/root/.ssh"))
        """)
    finally:
        marker.unlink()
    assert result.stdout == b"False False False\n"


def test_a_daemonised_child_is_dead_when_the_run_returns(grade):
    tag = uuid.uuid4().hex
    result = grade(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sh", ["sh", "-c", "exec sleep 600 # {tag}"])
        print("parent done")
    """)
    assert result.verdict == "ok"
    assert [pid for pid in Path("/proc").glob("[0-9]*") if tag in _cmdline(pid)] == []


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""  # it ended while we looked


def test_filling_the_disk_stops_at_the_layer_size(grade):
    """The layer and /tmp are tmpfs in memory: the host's disk is never written."""
    result = grade("""
        import errno
        try:
            with open("/tmp/fill", "wb") as out:
                while True:
                    out.write(b"x" * 1024 * 1024)
        except OSError as error:
            print(errno.errorcode[error.errno])
        with open("/fill", "wb") as out:
            try:
                out.write(b"y" * 32 * 1024 * 1024)
                out.flush()
            except OSError as error:
                print(errno.errorcode[error.errno])
    """, layer_size="8M")
    # ENOSPC from the full tmpfs, or EFBIG from the file size limit, which is the layer's size
    assert len(result.stdout.split()) == 2, result
    assert set(result.stdout.split()) <= {b"ENOSPC", b"EFBIG"}, result


def test_a_grader_loop_leaks_nothing_and_gets_every_verdict(python_rootfs):
    if os.geteuid() != 0:
        pytest.skip("needs cgroups")
    # (the time limits leave room for an emulated VM's slow Python start, but the busy loop's)
    corpus = [("print(1)", "ok", 30), ("raise SystemExit(1)", "runtime_error", 30),
              ("import os; os.kill(os.getpid(), 9)", "signal", 30),
              ("while True: pass", "timeout", 0.5)]
    fds_before = len(os.listdir("/proc/self/fd"))
    with ContainerRuntime() as runtime:
        for _ in range(5):
            for snippet, verdict, seconds in corpus:
                got = runtime.run(python_rootfs, ["python3", "-c", snippet],
                                  **{**LIMITS, "timeout": seconds}).wait().verdict
                assert got == verdict, snippet
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_the_cli_prints_one_json_verdict(python_rootfs):
    if os.geteuid() != 0:
        pytest.skip("needs cgroups")
    done = subprocess.run([sys.executable, "-m", "pytest_minictr", "run", "--rootfs",
                           str(python_rootfs), "--memory", "64M", "--timeout", "5", "--json",
                           "--", "python3", "-c", "print('hi'); raise SystemExit(2)"],
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=60)
    report = json.loads(done.stdout)
    assert done.returncode == 2 and report["verdict"] == "runtime_error"
    assert report["stdout"] == "hi\n" and report["memory_peak"] > 0
    assert set(report) >= {"verdict", "returncode", "signal", "wall_time", "cpu_time",
                           "memory_peak", "oom_killed", "output_truncated", "stdout", "stderr"}
