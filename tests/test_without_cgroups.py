"""Every end a user asks for holds where this host gives us no cgroups (the null backend: an
ordinary account on a cgroup v1 host or without a delegated v2 subtree, or root where no
cgroup filesystem is mounted): a sandboxed body's timeout, a container's, an exec's, a stop
and a detached container's, each ending the whole tree; limits it cannot set fail or skip
the tests that ask for them, in one line. And a pytest killed with SIGKILL leaves nothing of
ours running (as an account and as root, with cgroups and without), even where a process it
forked outlives it."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_minictr import RootfsBuilder
from tests.conftest import processes_with
from tests.helpers import skip_unless_others_reach_the_checkout
from tests.unprivileged import python_command_as, user_environment, user_site

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(600)

# root in a mount namespace of its own, where no cgroup filesystem is mounted
WITHOUT_CGROUPFS = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'umount -R /sys/fs/cgroup && exec "$@"', "sh")
# the argument of our containers' sleeps, none of which may outlive its end (ours alone: the
# pid of this test process)
MARK = str(4_000_000 + os.getpid())
SPIN = f"sleep {MARK} & sleep {MARK} & while :; do :; done"
PLUGIN = ("-p", "pytest_minictr.plugin", "-p", "no:cacheprovider")


@dataclass(frozen=True)
class Python:
    """A Python that runs as someone, somewhere: the command its arguments follow, its
    environment, and a directory it may write (and we may read)."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str]
    place: Path

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command, *args], env=self.env, cwd=self.place,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def pytest(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("-m", "pytest", *PLUGIN, *self.pytest_places(), *args, timeout=timeout)

    def pytest_places(self) -> tuple[str, ...]:
        return (f"--basetemp={self.place / 'basetemp'}",
                f"--minictr-cache-dir={self.place / 'cache'}")

    def write(self, name: str, text: str) -> Path:
        path = self.place / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    def cgroup_backend(self) -> str:
        done = self.run("-c", "from pytest_minictr.host import cgroups; "
                              "print(cgroups.detect_or_null(prepare=False).name)")
        if done.returncode != 0:
            pytest.skip(f"{self.name}: {done.stderr.strip()[-300:]}")
        return done.stdout.strip()


@pytest.fixture(scope="module")
def open_place() -> Iterator[Path]:
    """A directory any user may enter, removed afterwards (pytest's own are 0700)."""
    place = Path(tempfile.mkdtemp(prefix="minictr-without-cgroups-"))
    place.chmod(0o755)
    yield place
    shutil.rmtree(place)


@pytest.fixture(scope="module")
def account(open_place) -> Iterator[Python]:
    """The system Python as an ordinary account made with useradd for these tests."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create an account")
    if not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("needs useradd and setpriv")
    skip_unless_others_reach_the_checkout()
    site = user_site(open_place)
    name = f"minictr-c{os.getpid()}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", name],
                   check=True, capture_output=True, timeout=60)
    try:
        user = pwd.getpwnam(name)
        home = Path(user.pw_dir)
        yield Python("an account", tuple(python_command_as(user.pw_uid, user.pw_gid)),
                     {**user_environment(home, site), "XDG_RUNTIME_DIR": str(home)}, home)
    finally:
        subprocess.run(["pkill", "-KILL", "-U", name], capture_output=True, timeout=60)
        subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)


def python_for(name: str, request: pytest.FixtureRequest, open_place: Path) -> Python:
    """The Python `name`s: "an account", "root without cgroups" (both checked to have none:
    the null backend), or "root"."""
    if name == "an account":
        python = request.getfixturevalue("account")
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root")
        if name == "root":
            return root_python(open_place / "root", (), name)
        if not shutil.which("unshare"):
            pytest.skip("needs unshare (util-linux)")
        python = root_python(open_place / "root-without-cgroups", WITHOUT_CGROUPFS, name)
    backend = python.cgroup_backend()
    if backend != "none":
        pytest.skip(f"{python.name} has cgroups here ({backend}): the host delegates them")
    return python


def root_python(place: Path, command: tuple[str, ...], name: str) -> Python:
    place.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(place),
           "PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "MINICTR_STATE_DIR": str(place / "state")}  # not the host's /run/minictr
    return Python(name, (*command, sys.executable), env, place)


@pytest.fixture(scope="module", params=["an account", "root without cgroups"])
def without_cgroups(request, open_place) -> Python:
    """A Python for which this host has no cgroups (the null backend)."""
    return python_for(request.param, request, open_place)


@pytest.fixture(scope="module")
def world_readable_rootfs(open_place) -> Path:
    cache = open_place / "rootfs-cache"
    cache.mkdir()
    return RootfsBuilder(cache_dir=cache).build(binaries=["sh", "sleep"])


# --- a sandboxed body's timeout -----------------------------------------------------------------

BODIES = """
import time
import pytest

@pytest.mark.container(timeout=1)
def test_sleeps():
    time.sleep(5)

@pytest.mark.container(timeout=1)
def test_spins():
    while True:
        pass
"""


def call_durations(output: str) -> dict[str, float]:
    """The calls' durations of pytest's --durations report, by test name."""
    return {name: float(seconds) for seconds, name in
            re.findall(r"^([\d.]+)s call\s+\S+::(\w+)$", output, re.MULTILINE)}


def test_a_sandboxed_body_is_killed_at_its_timeout_without_cgroups(without_cgroups):
    python = without_cgroups
    python.write("test_bodies.py", BODIES)
    done = python.pytest("test_bodies.py", "--durations=0", "--durations-min=0", timeout=60)
    assert "2 failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("timeout=1s: the test body was killed at its timeout") == 2
    durations = call_durations(done.stdout)
    assert set(durations) == {"test_sleeps", "test_spins"}, done.stdout[-3000:]
    assert max(durations.values()) < 3, durations


# --- containers, execs, stops, detached containers ------------------------------------------

ENDS = f"""
import json, sys, time
from pytest_minictr import ContainerRuntime
rootfs = sys.argv[1]
ends = {{}}

def timed(name, call):
    start = time.monotonic()
    result = call()
    ends[name] = [time.monotonic() - start, result.returncode]

with ContainerRuntime() as runtime:
    timed("timeout", lambda: runtime.run(rootfs, ["sh", "-c", {SPIN!r}], timeout=1).wait())
    stubborn = runtime.run(rootfs, ["sh", "-c", "trap '' TERM; " + {SPIN!r}])
    time.sleep(0.3)
    timed("stop", lambda: stubborn.stop(grace=1))
    beside = runtime.run(rootfs, ["sleep", "60"])
    timed("exec", lambda: beside.exec(["sh", "-c", {SPIN!r}], timeout=1))
    beside.kill()
print(json.dumps(ends))
"""


def test_containers_execs_and_stops_end_their_whole_tree_without_cgroups(
        without_cgroups, world_readable_rootfs):
    done = without_cgroups.run("-c", ENDS, str(world_readable_rootfs))
    assert done.returncode == 0, done.stderr[-3000:]
    ends = json.loads(done.stdout)
    assert ends["timeout"][1] == ends["exec"][1] == ends["stop"][1] == -signal.SIGKILL, ends
    # each ends at its limit (the exec's sleeps held its pipes until the container ended)
    assert all(seconds < 3 for seconds, _ in ends.values()), ends
    assert_no_sleeps_left()


REFUSED = """
import sys
from pytest_minictr import ContainerRuntime, UnsupportedError
with ContainerRuntime() as runtime:
    try:
        runtime.run(sys.argv[1], ["true"], cpu_time_limit=1)
    except UnsupportedError as error:
        print(error)
"""


def test_a_cpu_time_limit_is_refused_without_cgroups(without_cgroups, world_readable_rootfs):
    """RLIMIT_CPU alone counts one process at a time: a program that forks would get its
    budget many times over, so the limit is refused out loud, never kept halfway."""
    done = without_cgroups.run("-c", REFUSED, str(world_readable_rootfs))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("cpu_time_limit=1 needs a cgroup that counts the CPU time "
                                  "of the whole container: "), done.stdout


def test_a_detached_container_ends_its_tree_at_its_timeout_and_stop_without_cgroups(
        without_cgroups, world_readable_rootfs):
    def minictr(*args: str) -> str:
        done = without_cgroups.run("-m", "pytest_minictr", *args)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip()
    run = ("run", "-d", "--rootfs", str(world_readable_rootfs))
    timed = minictr(*run, "--timeout", "1", "--", "sh", "-c", SPIN)
    stopped = minictr(*run, "--", "sh", "-c", "trap '' TERM; " + SPIN)
    try:
        for command, expected in ((("wait", timed), "137"),
                                  (("stop", "--time", "1", stopped), "")):
            start = time.monotonic()
            assert minictr(*command) == expected
            assert time.monotonic() - start < 4, command  # (a start of the CLI included)
    finally:
        minictr("rm", "--force", timed, stopped)
    assert_no_sleeps_left()


def assert_no_sleeps_left() -> None:
    """No `sleep MARK` runs (a killed one may take a moment to go)."""
    deadline = time.monotonic() + 2
    while processes_with(MARK) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(MARK)


# --- a killed pytest --------------------------------------------------------------------------

KILLED = f"""
import os, time
import pytest

MARKS = os.environ["MINICTR_TEST_MARKS"]

def mark(name, text=""):
    with open(os.path.join(MARKS, name), "w") as f:
        f.write(text)

@pytest.mark.container
def test_starts_the_bodies_launcher():
    pass

@pytest.fixture
def service(minictr_service):
    return minictr_service(binaries=["sleep"], command=["sleep", "{MARK}"])

@pytest.fixture
def holder():
    # forked from pytest, as multiprocessing's fork start method makes one: it holds
    # pytest's descriptors (the launchers' sockets among them) and outlives it
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    mark("holder", str(pid))

@pytest.mark.container(writable=[MARKS])
def test_spins(service, holder):
    mark("spinning")
    while True:
        pass
"""


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent, start time, state), from /proc/PID/stat."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[19], fields[0])
    return table


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below `root`."""
    table = process_table()
    found, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, started, _) in table.items():
            if ppid == parent:
                found.add((pid, started))
                todo.append(pid)
    return found


def alive(processes: set[tuple[int, str]]) -> list[str]:
    """Those of `processes` still running (a zombie runs nothing), with their command lines."""
    table = process_table()
    running = []
    for pid, started in processes:
        if pid in table and table[pid][1] == started and table[pid][2] != "Z":
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            running.append(f"{pid} {command.decode(errors='replace')[:120]}")
    return running


@pytest.fixture(params=["an account", "root without cgroups", "root"])
def any_python(request, open_place) -> Python:
    return python_for(request.param, request, open_place)


def test_a_killed_pytest_leaves_no_body_or_container_running(any_python):
    python = any_python
    marks = python.place / "marks"
    marks.mkdir(exist_ok=True)
    marks.chmod(0o777)
    python.write("test_killed.py", KILLED)
    output = python.place / "killed.out"  # (a file: the holder keeps a pipe open)
    with output.open("w") as out:
        pytest_run = subprocess.Popen(
            [*python.command, "-m", "pytest", *PLUGIN, *python.pytest_places(),
             "test_killed.py"], env={**python.env, "MINICTR_TEST_MARKS": str(marks)},
            cwd=python.place, stdout=out, stderr=subprocess.STDOUT)
    holder: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 120
        while not (marks / "spinning").exists():
            assert pytest_run.poll() is None, output.read_text()[-3000:]
            assert time.monotonic() < deadline, "the body never started"
            time.sleep(0.05)
        ours = descendants(pytest_run.pid)
        holder = {(pid, started) for pid, started in ours
                  if pid == int((marks / "holder").read_text())}
        pytest_run.kill()
        pytest_run.wait()
        deadline = time.monotonic() + 5
        while (left := alive(ours - holder)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"left running after pytest's SIGKILL: {left}"
    finally:
        if pytest_run.poll() is None:
            pytest_run.kill()
            pytest_run.wait()
        for pid, started in holder:
            if alive({(pid, started)}):
                os.kill(pid, signal.SIGKILL)


ARMED = """
import ctypes, signal
import pytest

PR_GET_PDEATHSIG = 2

@pytest.mark.container
def test_dies_with_the_worker():
    armed = ctypes.c_int()
    assert ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(armed), 0, 0, 0) == 0
    assert armed.value == signal.SIGKILL
"""


@pytest.mark.needs_root
def test_a_body_dies_with_its_worker_whatever_the_launcher_does(pytester):
    """As root the body is the worker's child (in a spare's PID namespace): it dies with the
    worker on its own, its confinement notwithstanding (without root, the keeper does, and
    takes the body's namespace along)."""
    pytester.makepyfile(test_armed=ARMED)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


# --- limits this host cannot set ---------------------------------------------------------------

LIMITED = """
import pytest

@pytest.fixture
def limited(minictr_service):
    return minictr_service(binaries=["sleep"], command=["sleep", "60"], memory="64M")

def test_uses_a_limited_service(limited):
    pass

@pytest.mark.container(pids=10)
def test_a_limited_body():
    pass
"""


def test_limits_this_host_cannot_set_fail_or_skip_in_one_line(pytester, request, cache_dir,
                                                              tmp_path):
    """A service's as a body's: as --minictr-unavailable says, never a traceback."""
    python = python_for("root without cgroups", request, tmp_path)
    pytester.makepyfile(test_limited=LIMITED)

    def run_pytest(*args: str) -> pytest.RunResult:
        return pytester.run(*python.command, "-m", "pytest", "-p", "no:cacheprovider",
                            f"--minictr-cache-dir={cache_dir}", *args, timeout=120)
    failed = run_pytest()
    failed.assert_outcomes(errors=1, failed=1)
    reason = "minictr cannot run containers here: resource limits need cgroups: *"
    failed.stdout.fnmatch_lines([f"{reason}(--minictr-unavailable=skip skips such tests)"] * 2)
    assert "Traceback" not in failed.stdout.str() and "UnsupportedError" not in failed.stdout.str()
    skipped = run_pytest("--minictr-unavailable=skip", "-rs")
    skipped.assert_outcomes(skipped=2)
    skipped.stdout.fnmatch_lines([f"SKIPPED * {reason}"] * 2)
