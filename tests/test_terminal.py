"""`-t`/`-it` on a real pseudo-terminal: the command's own pty, our window size passed on (and
on SIGWINCH), job control in a shell, ^C reaching the container's foreground group, our
terminal restored on every way out; `exec -it` too. Each test drives `minictr` on a pty of its
own (pty.fork, then exec: no interactive wait can hang the suite; every read has a deadline),
so it needs no terminal of the CI's and works with SIGINT ignored."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 30.0  # seconds any expected output may take (a first rootfs build included)
# runs minictr's main() on the pty it is given, then says whether the terminal's modes are
# the ones it had before
DRIVER = """
import fcntl, signal, struct, sys, termios
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a CI runner may start us: ^C must still work
fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
before = termios.tcgetattr(0)
from pytest_minictr.cli.main import main
code = main(sys.argv[1:])
print("RESTORED" if termios.tcgetattr(0) == before else "CHANGED", "status", code)
"""


class Session:
    """minictr ARGS on a new pty; `expect` reads until a text shows up (or fails)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover (replaced by exec at once)
            os.environ.update({"PYTHONPATH": str(REPO), **(env or {})})
            os.execv(sys.executable, [sys.executable, "-c", DRIVER, *args])
        self.seen = b""

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, text: bytes, deadline: float = DEADLINE) -> bytes:
        end = time.monotonic() + deadline
        while text not in self.seen:
            left = end - time.monotonic()
            assert left > 0, f"no {text!r} in {deadline:g} s; the terminal showed {self.seen!r}"
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # EIO: the driver has exited
                    assert text in self.seen, f"ended without {text!r}: {self.seen!r}"
        found = self.seen
        self.seen = self.seen[self.seen.index(text) + len(text):]
        return found

    def resize(self, rows: int, columns: int) -> None:
        # on the master: the kernel sends SIGWINCH to the driver, our foreground group
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def close(self) -> int:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return status


@pytest.fixture
def session():
    opened = []

    def open_session(*args: str, env: dict | None = None) -> Session:
        opened.append(Session(*args, env=env))
        return opened[-1]
    yield open_session
    for each in opened:
        each.close()


def test_an_interactive_shell_gets_the_size_job_control_and_ctrl_c(session, cache_dir):
    shell = session("run", "-it", "--bin", "stty", "--", "sh",
                    env={"MINICTR_CACHE_DIR": str(cache_dir)})
    shell.send(b"stty size\n")
    shell.expect(b"30 100")
    shell.resize(40, 120)
    time.sleep(0.2)  # the driver copies the size on SIGWINCH, asynchronously
    shell.send(b"stty size\n")
    shell.expect(b"40 120")
    shell.send(b"sleep 60\n")
    time.sleep(0.5)
    shell.send(b"\x03")  # ^C: the pty's SIGINT to the foreground group (sleep), not to us
    shell.send(b"echo status=$?\n")
    shell.expect(b"status=130")
    shell.send(b"sleep 60 &\n")
    shell.send(b"jobs\n")
    shell.expect(b"Running")
    shell.send(b"kill %1; exit 3\n")
    shell.expect(b"RESTORED status 3")


def test_the_command_names_its_terminal_and_ps_shows_it(session, cache_dir):
    """The pty is the container's own (its devpts): ttyname() finds it. (The typed line is
    echoed: each expected text is one the command's output alone holds.)"""
    shell = session("run", "-it", "--bin", "tty", "--bin", "ps", "--bin", "sed", "--", "sh",
                    env={"MINICTR_CACHE_DIR": str(cache_dir)})
    shell.send(b"tty | sed s/pts/PTS/; test -t 0 && echo on-a-''tty\n")
    shell.expect(b"/dev/PTS/0")
    shell.expect(b"on-a-tty")
    shell.send(b"ps -o tty= -p $$ | sed s/pts/PS-PTS/; echo IN-$(ls /dev/pts)\n")
    shell.expect(b"PS-PTS/0")
    shell.expect(b"IN-0 ptmx")  # its own pty, and no other
    shell.send(b"exit 5\n")
    shell.expect(b"RESTORED status 5")


def test_the_terminal_is_restored_when_minictr_is_terminated(session, cache_dir):
    running = session("run", "-it", "--", "sh", "-c", "echo ready; sleep 60",
                      env={"MINICTR_CACHE_DIR": str(cache_dir)})
    running.expect(b"ready")  # our terminal is raw now
    os.kill(running.pid, signal.SIGTERM)  # forwarded: the command ends, and so do we
    running.expect(b"RESTORED status 143")


def test_exec_it_reaches_a_detached_container(session, cache_dir, tmp_path):
    env = {"MINICTR_CACHE_DIR": str(cache_dir), "MINICTR_STATE_DIR": str(tmp_path / "state")}
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}

    def minictr(*args: str):
        return subprocess.run([sys.executable, "-m", "pytest_minictr", *args],
                              capture_output=True, env=environment, timeout=120)
    started = minictr("run", "-d", "--name", "box", "--bin", "stty", "--bin", "tty", "--bin",
                      "sed", "--", "sleep", "600")
    assert started.returncode == 0, started.stderr
    try:
        shell = session("exec", "-it", "box", "--", "sh", env=env)
        shell.send(b"stty size; tty | sed s/pts/PTS/; test -t 0 && echo on-a-''tty\n")
        shell.expect(b"30 100")
        shell.expect(b"/dev/PTS/0")
        shell.expect(b"on-a-tty")
        shell.send(b"sleep 60\n")
        time.sleep(0.5)
        shell.send(b"\x03")
        shell.send(b"echo status=$?\n")
        shell.expect(b"status=130")
        shell.send(b"exit 4\n")
        shell.expect(b"RESTORED status 4")
    finally:
        minictr("rm", "-f", "box")


def test_t_without_a_terminal_of_ours_still_gives_the_command_one(cache_dir):
    done = subprocess.run([sys.executable, "-m", "pytest_minictr", "run", "-t", "--", "sh",
                           "-c", "test -t 0 && test -t 1 && echo tty; exit 2"],
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "MINICTR_CACHE_DIR": str(cache_dir)})
    assert (done.returncode, done.stdout) == (2, b"tty\r\n"), done.stderr
