"""The cgroup package on the real kernel: limits bite, measurements are right, kill() leaves
nothing running, remove() leaves nothing on disk, reap_stale() only takes the dead's groups.

The same file runs on this cgroup v1 (hybrid) host and, through ci/vm-tests, on a pure cgroup v2
kernel. No mocks: every test starts real processes in a real group. Needs root.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_minictr.errors import ConfigError, MinictrError, UnsupportedError
from pytest_minictr.host import cgroups, linux
from pytest_minictr.spec import Limits

MiB = 1024 ** 2
_counter = itertools.count()

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux")


@pytest.fixture(scope="module")
def backend() -> cgroups.CgroupBackend:
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root (they create cgroups); run them as root")
    try:
        return cgroups.detect()
    except UnsupportedError as e:
        pytest.skip(f"this host cannot run cgroups: {e}")


@pytest.fixture
def new_group(backend):
    """Makes groups for the test; afterwards kills and removes them, then checks that no
    minictr-<our pid>@* directory is left in any hierarchy."""
    made = []

    def make(limits: Limits = Limits(), name: str | None = None) -> cgroups.Cgroup:
        group = backend.create(name or cgroups.group_name(f"t{next(_counter)}"), limits)
        made.append(group)
        return group

    yield make
    for group in made:
        group.kill()
        group.remove()
    left = [str(p) for parent in backend.parent_dirs
            for p in Path(parent).glob(f"minictr-{os.getpid()}@*")]
    left += [path for group in made for path in group.paths if os.path.exists(path)]
    assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def spawn():
    """Starts a command already inside a group (it joins before exec, as the launcher's first
    child does); afterwards nothing it started is left unwaited."""
    started = []

    def start(group: cgroups.Cgroup, argv: list[str], **kwargs) -> subprocess.Popen:
        # joining between fork and exec is what is tested; the test starts no thread
        proc = subprocess.Popen(argv, preexec_fn=lambda: group.join(os.getpid()),  # noqa: PLW1509
                                **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()


def procs_listed(group: cgroups.Cgroup) -> list[int]:
    """What the kernel lists in cgroup.procs, read straight from the filesystem."""
    return [int(pid) for path in group.paths
            for pid in Path(path, "cgroup.procs").read_text().split()]


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# --- finding the hierarchies -------------------------------------------------------------------

HYBRID_MOUNTINFO = r"""
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer ro,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 31 0:32 / /mnt/my\040memory rw,relatime - cgroup cgroup rw,memory
"""


def test_mount_parser_reads_controllers_from_options_not_paths():
    mounts = cgroups.parse_cgroup_mounts(HYBRID_MOUNTINFO)
    by_point = {m.mount_point: m for m in mounts}
    assert by_point["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert by_point["/sys/fs/cgroup/systemd"].controllers == frozenset()
    assert by_point["/sys/fs/cgroup/freezer"].read_only
    assert by_point["/sys/fs/cgroup/unified"].version == 2
    assert "/mnt/my memory" in by_point
    assert "/sys/fs/cgroup" not in by_point           # the tmpfs holding them is not one


def test_co_mounted_cpu_and_cpuacct_share_one_directory():
    from pytest_minictr.host.cgroups.v1 import V1Backend  # layout only: nothing is created

    backend = V1Backend({"cpu": "/h/cpu,cpuacct", "cpuacct": "/h/cpu,cpuacct",
                         "freezer": "/h/freezer"})
    group = backend.open("minictr-1-a")
    assert backend.parent_dirs == ("/h/cpu,cpuacct/minictr", "/h/freezer/minictr")
    assert group.paths == ("/h/cpu,cpuacct/minictr/minictr-1-a", "/h/freezer/minictr/minictr-1-a")
    assert group.dirs["cpu"] == group.dirs["cpuacct"]


def test_detect_picks_the_version_the_host_runs(backend):
    # A pure v2 host mounts cgroup2 itself at /sys/fs/cgroup; a hybrid one a tmpfs there.
    pure_v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    assert backend.name == ("v2" if pure_v2 else "v1")
    assert all(os.path.isdir(parent) for parent in backend.parent_dirs)


def test_group_names_must_carry_the_owner_pid(backend):
    with pytest.raises(ConfigError, match="group_name"):
        backend.create("../escape", Limits())


def test_a_group_name_says_its_owner_and_the_pid_namespace_its_pid_means_something_in():
    here = os.stat("/proc/self/ns/pid").st_ino
    assert cgroups.owner_of(cgroups.group_name("a-1", owner_pid=42)) == cgroups.Owner(42, here)
    assert cgroups.owner_of(cgroups.group_name("b", 7, pid_namespace=9)) == cgroups.Owner(7, 9)
    assert cgroups.owner_of("minictr-42-abc") == cgroups.Owner(42, None)  # an older name
    assert cgroups.owner_of("minictr-x") is None and cgroups.owner_of("minictr-4@-a") is None


# --- limits and measurements -------------------------------------------------------------------

def test_group_without_limits_still_measures(new_group, spawn):
    group = new_group()
    proc = spawn(group, [sys.executable, "-c",
                         "b = bytearray(24 << 20)\n"
                         "for i in range(0, len(b), 4096): b[i] = 1"])
    assert proc.wait() == 0
    stats = group.stats()
    assert stats.memory_peak >= 24 * MiB
    assert stats.cpu_time > 0
    assert stats.oom_killed is False
    assert stats.pids_current == 0


def test_memory_hog_is_oom_killed(new_group, spawn):
    group = new_group(Limits(memory=32 * MiB))
    proc = spawn(group, [sys.executable, "-c",
                         "hog = []\n"
                         "for _ in range(512): hog.append(bytearray(1 << 20))\n"
                         "print('survived')"], stdout=subprocess.PIPE)
    out, _ = proc.communicate()
    assert proc.returncode == -9, out
    stats = group.stats()
    assert stats.oom_killed is True
    assert 16 * MiB <= stats.memory_peak <= 32 * MiB


FORK_UNTIL_REFUSED = """
import os, sys
r, w = os.pipe()
forked, refused = 0, 0
while forked < 100:
    try:
        pid = os.fork()
    except OSError as e:
        refused = e.errno
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)        # wait for the parent to let go
        os._exit(0)
    forked += 1
print(forked, refused, flush=True)
sys.stdin.read()
os.close(w)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def test_pids_limit_bounds_a_fork_loop(new_group, spawn):
    group = new_group(Limits(pids=8))
    proc = spawn(group, [sys.executable, "-c", FORK_UNTIL_REFUSED],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    forked, refused = map(int, proc.stdout.readline().split())
    assert (forked, refused) == (7, errno.EAGAIN)         # 7 children + the parent = 8
    assert group.stats().pids_current == 8
    proc.stdin.close()
    assert proc.wait() == 0


def test_cpus_throttle_a_busy_loop(new_group, spawn):
    group = new_group(Limits(cpus=0.25))
    start = time.monotonic()
    spawn(group, ["sh", "-c", "while :; do :; done"])
    time.sleep(1.0)
    cpu_time, wall = group.stats().cpu_time, time.monotonic() - start
    # 25 ms of CPU per 100 ms period; unthrottled it would be ~1 CPU-s per second.
    assert 0.05 < cpu_time <= 0.3 * wall + 0.05, (cpu_time, wall)


# --- kill and remove ---------------------------------------------------------------------------

def test_kill_takes_a_forking_tree(new_group, spawn):
    group = new_group(Limits(pids=2000))               # a safety net, far above what we wait for
    proc = spawn(group, ["sh", "-c", "while :; do sleep 100 & done"])
    assert _wait_for(lambda: len(procs_listed(group)) >= 20), "the tree never grew"
    seen = procs_listed(group)
    group.kill()
    assert procs_listed(group) == []
    assert proc.wait() == -9
    assert not [pid for pid in seen if is_running(pid)]
    time.sleep(0.1)                                    # nothing forked late, from nowhere
    assert procs_listed(group) == []


def test_remove_leaves_no_directory_and_can_be_repeated(new_group):
    group = new_group(Limits(memory=64 * MiB, cpus=0.5, pids=10))
    assert all(os.path.isdir(path) for path in group.paths)
    group.remove()
    assert not [path for path in group.paths if os.path.exists(path)]
    group.remove()


def test_remove_takes_child_groups_first(new_group):
    """A command with write access to its group may have made groups below it."""
    group = new_group()
    for path in group.paths:
        os.mkdir(os.path.join(path, "inner"))
    group.remove()
    assert not [path for path in group.paths if os.path.exists(path)]


def test_create_makes_a_removed_parent_again(backend, monkeypatch):
    """The `minictr` parent is made at start-up, and later only when a create() finds it gone
    (another launcher's release() took it, or an admin): the group still gets its limits."""
    monkeypatch.setattr(cgroups.v1, "PARENT_NAME", f"minictr-test-{os.getpid()}")
    monkeypatch.setattr(cgroups.v2, "PARENT_NAME", f"minictr-test-{os.getpid()}")
    ours = cgroups.detect()
    try:
        for _ in range(2):
            group = ours.create(cgroups.group_name("t"), Limits(memory=64 * MiB))
            limits = [Path(path, name).read_text().strip() for path in group.paths
                      for name in ("memory.max", "memory.limit_in_bytes")
                      if Path(path, name).exists()]
            assert limits == [str(64 * MiB)]
            group.remove()
            ours.release()
            assert not [path for path in ours.parent_dirs if os.path.exists(path)]
    finally:
        ours.release()


def test_remove_waits_for_a_dying_process(new_group, spawn):
    group = new_group()
    # Freeing 64 MiB takes the exiting process a moment, during which rmdir says EBUSY.
    proc = spawn(group, [sys.executable, "-c",
                         "b = bytearray(64 << 20)\n"
                         "for i in range(0, len(b), 4096): b[i] = 1\n"
                         "print('ready', flush=True)\n"
                         "import time; time.sleep(100)"], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    reaper = threading.Thread(target=proc.wait)
    reaper.start()
    os.kill(proc.pid, 9)
    group.remove()
    reaper.join()
    assert proc.returncode == -9
    assert not [path for path in group.paths if os.path.exists(path)]


def test_remove_of_a_busy_group_fails_naming_the_path(new_group, spawn):
    group = new_group()
    spawn(group, ["sleep", "100"])
    assert _wait_for(lambda: procs_listed(group))
    start = time.monotonic()
    with pytest.raises(MinictrError, match=re.escape(group.paths[0])):
        group.remove()
    assert 1.5 < time.monotonic() - start < 10
    group.kill()
    group.remove()


def test_reap_stale_takes_dead_owners_groups_only(backend, new_group, spawn):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead_pid = finished.pid                            # reaped: no process has this pid now
    stale = new_group(name=cgroups.group_name("stale", owner_pid=dead_pid))
    live = new_group(name=cgroups.group_name("live"))
    # As after a launcher crash: the stale group's process is an orphan nobody will stop.
    starter = spawn(stale, ["sh", "-c", "sleep 100 & echo $!"], stdout=subprocess.PIPE)
    orphan = int(starter.stdout.readline())
    starter.wait()
    keeper = spawn(live, ["sleep", "100"])

    removed = cgroups.reap_stale(backend)

    assert stale.name in removed and live.name not in removed
    assert not [path for path in stale.paths if os.path.exists(path)]
    assert not is_running(orphan)
    assert all(os.path.isdir(path) for path in live.paths)
    assert keeper.poll() is None


def test_reap_stale_in_another_pid_namespace_kills_nothing_of_ours(backend, new_group, spawn):
    # Seen from a new PID namespace (a CI job's container sharing the host's cgroupfs), our
    # pid is no process: a reap that judged it there would remove the group a spare of ours
    # is about to join, and try to kill our live container (whose pids read 0 there).
    live = new_group()
    keeper = spawn(live, ["sleep", "100"])
    about_to_be_joined = new_group()
    code = "from pytest_minictr.host import cgroups; print(cgroups.reap_stale())"
    inner = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=60, check=False)
    assert inner.returncode == 0 and not inner.stderr, inner.stderr
    assert live.name not in inner.stdout and about_to_be_joined.name not in inner.stdout
    assert all(os.path.isdir(path) for path in live.paths + about_to_be_joined.paths)
    assert keeper.poll() is None


def test_another_pid_namespaces_group_goes_only_once_empty_and_old(backend, new_group, spawn):
    busy = new_group(name=cgroups.group_name("busy", pid_namespace=1))
    keeper = spawn(busy, ["sleep", "100"])
    empty = new_group(name=cgroups.group_name("empty", pid_namespace=1))

    assert empty.name not in backend.reap_stale()  # young: its owner may be about to fill it
    removed = backend.reap_stale(grace=0)

    assert empty.name in removed and busy.name not in removed
    assert not [path for path in empty.paths if os.path.exists(path)]
    assert keeper.poll() is None


# --- without privileges ------------------------------------------------------------------------

def detect_in_forked_child(prepare) -> str:
    """What detect() says in a forked child of this test after `prepare()` has run there.

    A fork, not a new interpreter: it needs no Python reachable by another uid (pyenv
    Pythons under /root are not), and what `prepare` changes dies with the child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            prepare()
            reaped = cgroups.reap_stale()
            try:
                cgroups.detect()
                outcome = "detect() did not raise"
            except UnsupportedError as e:
                outcome = f"UnsupportedError: {e}"
            os.write(write_end, f"reap_stale() -> {reaped!r}; {outcome}".encode())
        except BaseException as e:  # noqa: BLE001 - told to the parent, which asserts
            os.write(write_end, f"prepare failed: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


def test_detect_as_unprivileged_user_names_the_fix(backend):
    def become_nobody():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    said = detect_in_forked_child(become_nobody)
    assert said.startswith("reap_stale() -> []; UnsupportedError: "), said
    if backend.name == "v2":
        assert "systemd-run --user --scope -p Delegate=yes" in said
    else:
        assert "run as root" in said


def test_detect_on_read_only_cgroupfs_names_the_fix(backend):
    def make_cgroupfs_read_only():
        # Only in the child's own mount namespace, made private first so that nothing can
        # propagate back; a bind remount changes the per-mount flag, not the host's cgroupfs.
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        for mount in cgroups.parse_cgroup_mounts(Path("/proc/self/mountinfo").read_text()):
            linux.mount(None, mount.mount_point, None,
                        linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY)

    said = detect_in_forked_child(make_cgroupfs_read_only)
    assert "UnsupportedError: " in said and "read-only" in said, said
    assert "--privileged" in said


def _wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            return value
        time.sleep(0.01)
    return value
