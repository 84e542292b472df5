"""Fixtures of the escape suite: the C helper (escape.c) built once per session, a rootfs
holding it, and ways to run it inside a container and to look at the host around it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pytest_minictr import RootfsBuilder

HERE = Path(__file__).resolve().parent
# Where the helper lives inside: the path it is built at is under the host's /tmp, which every
# container covers with a tmpfs of its own.
HELPER = "/usr/bin/escape"
libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="session")
def escape_helper(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the escape suite is about a root launcher's containers: run it as root")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build the escape helper")
    binary = tmp_path_factory.mktemp("escape") / "escape"
    subprocess.run([compiler, "-O1", "-Wall", "-Werror", "-o", str(binary),
                    str(HERE / "escape.c")], check=True, capture_output=True)
    return binary


@pytest.fixture(scope="session")
def escape_rootfs(escape_helper, tmp_path_factory) -> Path:
    """sh and friends, and the helper (listed so that its libraries come along)."""
    rootfs = RootfsBuilder().build(
        binaries=["sh", "cat", "ls", "sleep", str(escape_helper)],
        dest=tmp_path_factory.mktemp("escape-rootfs") / "rootfs")
    shutil.copy2(escape_helper, rootfs / HELPER.lstrip("/"))
    return rootfs


@pytest.fixture
def escape(runtime, escape_rootfs):
    """escape(*args, **run_kwargs) -> the helper's one line of output, run in a container."""
    def run(*args: str, **kwargs) -> str:
        return attempts(runtime, escape_rootfs, [args], **kwargs)[0]
    return run


@pytest.fixture
def escapes(runtime, escape_rootfs):
    """escapes([args, args...], **run_kwargs) -> one line per attempt, all in one container."""
    def run(attempt_list, **kwargs) -> list[str]:
        return attempts(runtime, escape_rootfs, attempt_list, **kwargs)
    return run


def attempts(runtime, rootfs, attempt_list, **kwargs) -> list[str]:
    script = "; ".join(shlex.join(["escape", *args]) for args in attempt_list)
    result = runtime.run(rootfs, ["sh", "-c", script], timeout=30, **kwargs).wait()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(attempt_list), result.stdout
    return lines


# --- the host around the container ------------------------------------------------------------

def host_mount_points() -> set[str]:
    """The host's mount points, less pytest's temp dirs (other tests mount there)."""
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return {point for point in points if not point.startswith("/tmp/pytest-of-")}


def container_uid_range() -> range:
    from pytest_minictr.host.idmap import MAPPED_IDS, id_range
    start = id_range("subuid")
    return range(start, start + MAPPED_IDS)


def key_users_in_container_range() -> list[str]:
    """Lines of /proc/key-users (every uid that holds keys) for uids of container root."""
    ids = container_uid_range()
    return [line for line in Path("/proc/key-users").read_text().splitlines()
            if int(line.split(":")[0]) in ids]


def checked(value: int, what: str) -> int:
    """A libc call's result through ctypes, or its errno raised as OSError."""
    if value < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return value


@contextlib.contextmanager
def running(runtime, rootfs, script: str, ready: str, **kwargs):
    """A container running `script`, given once its command (the init's child) has become
    the program named `ready` and waits (asleep: the program has started, not just been
    exec'd; its dynamic loader holds an fd of its own while it maps the libraries, which a
    look at the fds taken between exec and main() would see); yields (container, command's
    host pid). Killed on the way out."""
    container = runtime.run(rootfs, ["sh", "-c", script], timeout=30, **kwargs)
    try:
        deadline = time.monotonic() + 10
        while True:
            children = Path(f"/proc/{container.pid}/task/{container.pid}/children").read_text()
            if children.split():
                command = int(children.split()[0])
                if Path(f"/proc/{command}/comm").read_text().strip() == ready \
                        and process_state(command) == "S":
                    break
            assert time.monotonic() < deadline, "the command never got going"
            time.sleep(0.01)
        yield container, command
    finally:
        container.kill()


def process_state(pid: int) -> str:
    """R, S, D...: field 3 of /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def proc_status(pid: int | str) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
