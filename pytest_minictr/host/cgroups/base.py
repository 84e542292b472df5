"""What every cgroup backend offers, and the file-level steps v1 and v2 share.

Contract: a `CgroupBackend` (picked once per process by `cgroups.detect()`) creates one
`Cgroup` per container; the caller joins the container's first process to it, reads
`stats()`, `kill()`s the whole tree and `remove()`s it. Callers never ask which cgroup version
they are on. Everything here is plain file I/O on a mounted cgroupfs: we never mount, remount
or move the host's hierarchies, we only make directories under them.
"""

from __future__ import annotations

import abc
import errno
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from pytest_minictr.errors import ConfigError, MinictrError
from pytest_minictr.host import linux
from pytest_minictr.host.proc import read_stat
from pytest_minictr.spec import Limits

PARENT_NAME = "minictr"          # our one directory under each hierarchy's root
GROUP_PREFIX = "minictr-"        # per container: minictr-<launcher pid>@<its PID ns>-<serial>
_GROUP_NAME_RE = re.compile(r"^minictr-(\d+)(?:@(\d+))?-[A-Za-z0-9_.-]+$")
# seconds: a group of another PID namespace's launcher is only removed once empty and this
# old (see reap_stale): a young empty one may be a spare's, about to be joined.
FOREIGN_GRACE = 60.0

CPU_PERIOD_US = 100_000          # cpus=0.25 -> 25 000 us of CPU every 100 000 us
REMOVE_TIMEOUT = 2.0             # seconds rmdir keeps retrying EBUSY
KILL_TIMEOUT = 2.0               # seconds kill() keeps killing until the group is empty
FREEZE_TIMEOUT = 0.5             # seconds we wait for a freezer to report "frozen"

# Mount options of a v1 hierarchy that name the controllers we use; anything else in the
# options (rw, relatime, name=systemd, clone_children...) is not a controller we care about.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
LIMIT_CONTROLLERS = (("memory", "memory"), ("cpus", "cpu"), ("pids", "pids"))  # Limits field
V2_CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class CgroupStats:
    """What the kernel measured for a container's cgroup; None where this host cannot tell."""

    memory_peak: int | None = None     # bytes, highest usage seen
    memory_current: int | None = None  # bytes in use now
    cpu_time: float | None = None      # seconds of CPU, user + system, all processes
    oom_killed: bool | None = False    # the OOM killer killed something in the group
    pids_current: int | None = None    # tasks counted now (zombies included)


# --- names ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Owner:
    """The launcher a group name names: its pid, as seen in its PID namespace (the inode of
    /proc/<pid>/ns/pid; None in a name made before names carried it)."""

    pid: int
    pid_namespace: int | None


def group_name(container_id: str, owner_pid: int | None = None,
               pid_namespace: int | None = None) -> str:
    """The cgroup name of a container. Its owner (the launcher: this process unless said) and
    that owner's PID namespace let `reap_stale` find orphans: a pid means something only in
    its own namespace, and launchers in containers may share the host's cgroupfs."""
    pid = os.getpid() if owner_pid is None else owner_pid
    namespace = own_pid_namespace() if pid_namespace is None else pid_namespace
    return f"{GROUP_PREFIX}{pid}@{namespace}-{container_id}"


def owner_of(name: str) -> Owner | None:
    """The launcher a group name names, or None if the name is not one of ours."""
    match = _GROUP_NAME_RE.match(name)
    if match is None:
        return None
    return Owner(int(match.group(1)), None if match.group(2) is None else int(match.group(2)))


def own_pid_namespace() -> int:
    """Our PID namespace's inode (0 where /proc cannot tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def check_group_name(name: str) -> None:
    if owner_of(name) is None:
        raise ConfigError(f"cgroup name {name!r}: expected 'minictr-<launcher pid>@<its PID "
                          "namespace>-<id>' (id of letters, digits, '_', '.', '-'); use "
                          "cgroups.group_name()")


def process_is_alive(pid: int) -> bool:
    """True if `pid` runs; a zombie counts as dead, since it will never clean up after itself."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                       # exists, owned by someone else
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is None or stat.has_exited  # None: gone between the listing and now


# --- cgroupfs file I/O -------------------------------------------------------------------------

def write_raw(path: str, value: str | int) -> None:
    """One write(2) per value (see linux.write_file); OSError as it comes."""
    linux.write_file(path, str(value))


def write_value(path: str, value: str | int) -> None:
    try:
        write_raw(path, value)
    except OSError as e:
        raise MinictrError(f"cannot write {str(value)!r} to {path}: {e.strerror}") from e


def read_text(path: str) -> str | None:
    """The file's text, or None if this kernel (or a missing controller) has no such file.
    (Five of these end each container: linux.read_file, not a text file object.)"""
    try:
        return linux.read_file(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None or not text.strip().lstrip("-").isdigit():
        return None                # missing, or "max"
    return int(text)


def read_keyed(path: str) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, memory.oom_control) as a dict."""
    values = {}
    for line in (read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def list_processes(path: str) -> set[int]:
    """Pids in the group at `path` and in any group below it (a container that got write access
    to its cgroup could otherwise hide a process in a child group)."""
    pids: set[int] = set()
    for dirpath, _, _ in os.walk(path):
        text = read_text(os.path.join(dirpath, "cgroup.procs")) or ""
        pids.update(int(pid) for pid in text.split())
    return pids


def make_fresh_dir(path: str, make_parent: Callable[[], None]) -> None:
    """mkdir, replacing an empty leftover of the same name (a launcher pid can be reused).
    `make_parent()` makes the `minictr` parent again if it is gone: another launcher, exiting,
    may have removed it just now (see release()), or an admin. Only then: a container's group
    is made on every start, and the parent is nearly always there."""
    try:
        os.mkdir(path)
    except FileExistsError:
        remove_group_dir(path, timeout=0)
        os.mkdir(path)
    except FileNotFoundError:
        make_parent()
        os.mkdir(path)


def remove_group_dir(path: str, timeout: float = REMOVE_TIMEOUT) -> None:
    """rmdir the group and any child groups, deepest first; EBUSY is retried until `timeout`.

    rmdir of a cgroup fails with EBUSY while a task is still charged to it, and a task killed
    a moment ago may still be exiting: retry with small sleeps instead of failing at once.
    """
    try:
        os.rmdir(path)  # nearly always enough: walking a group lists its dozens of files
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.EBUSY:  # (EBUSY: a child group, or a task still exiting)
            raise MinictrError(f"cannot remove cgroup {path}: {e.strerror}") from e
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            for dirpath, _, _ in os.walk(path, topdown=False):
                os.rmdir(dirpath)
            return
        except FileNotFoundError:
            continue               # a child went away while we walked; walk again
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise MinictrError(f"cannot remove cgroup {path}: {e.strerror}") from e
            if time.monotonic() >= deadline:
                left = sorted(list_processes(path))
                raise MinictrError(
                    f"cannot remove cgroup {path}: still busy after {timeout:g} s "
                    f"(processes inside: {left or 'none listed, a task is still exiting'}); "
                    "kill() the group first") from e
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def kill_listed(pids: set[int], listed_now: Callable[[], set[int]]) -> None:
    """SIGKILL each pid, but only while it is still listed in the group.

    A pid read from cgroup.procs may exit and be reused by an unrelated process before we
    signal it. A pidfd pins the process we looked at: we open them all, list the group again,
    and signal only the pidfds whose pid is still in the group.
    """
    pidfds = {}
    try:
        for pid in pids:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                pass
        still_inside = listed_now()
        for pid, pidfd in pidfds.items():
            if pid in still_inside:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` with growing sleeps (1 ms to 20 ms); True once it holds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


# --- the interface -----------------------------------------------------------------------------

class Cgroup(abc.ABC):
    """One container's group, in one directory per hierarchy (v2: one; v1: one per mount)."""

    def __init__(self, name: str, paths: tuple[str, ...]):
        self.name = name
        self.paths = paths         # every directory of the group, for messages and checks

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {list(self.paths)}>"

    def join(self, pid: int) -> None:
        """Move `pid` into the group in every hierarchy. The container's first child calls this
        with its own pid before it unshares or execs, so it never runs unlimited."""
        for path in self.paths:
            try:
                write_raw(os.path.join(path, "cgroup.procs"), pid)
            except OSError as e:
                raise MinictrError(f"cannot move pid {pid} into cgroup {path}: "
                                   f"{e.strerror}") from e

    @abc.abstractmethod
    def apply_limits(self, limits: Limits) -> None:
        """Set `limits` (the backend's check_limits() has passed); None leaves one as it is.
        Works with processes inside: a spare init joins its group before its spec is known."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """What the kernel measured; still readable after every process has exited."""

    def processes(self) -> set[int]:
        """Live pids in the group (all hierarchies, child groups included; zombies left out,
        they hold no resources and only their parent can make them go)."""
        pids: set[int] = set()
        for path in self.paths:
            pids |= list_processes(path)
        return {pid for pid in pids if not _is_zombie(pid)}

    def kill(self) -> None:
        """SIGKILL every process in the group and return once none is left (or after
        KILL_TIMEOUT, e.g. a task stuck in uninterruptible sleep: remove() then reports it).

        Nothing escapes by forking: each round either uses the kernel's own group kill or kills
        a frozen group, and rounds repeat until the group lists no live process.
        """
        deadline = time.monotonic() + KILL_TIMEOUT
        while self.processes():
            if time.monotonic() >= deadline:
                return
            self._kill_round()
            # SIGKILL is delivered at once but exit (freeing memory, closing files) takes a
            # moment; only start another round if the group is still not empty by then.
            wait_until(lambda: not self.processes(), min(0.1, max(0, deadline - time.monotonic())))

    @abc.abstractmethod
    def _kill_round(self) -> None:
        """Kill every process in the group once, leaving no window for a fork to escape."""

    def remove(self) -> None:
        """rmdir the group in every hierarchy, retrying EBUSY briefly. Idempotent."""
        for path in self.paths:
            remove_group_dir(path)

    def discard(self) -> None:
        """Remove the group, killing what is still in it if it will not go; never raises.

        Called when a container has ended or a group is undone half-made, often while another
        error is on its way up: a group that still will not go (a task stuck in the kernel)
        must neither take the launcher down nor hide that error. It is reported, and the next
        launcher's reap_stale() tries again."""
        try:
            self.remove()
        except MinictrError:
            try:
                self.kill()
                self.remove()
            except MinictrError as error:
                print(f"minictr: {error}", file=sys.stderr)


class CgroupBackend(abc.ABC):
    """One cgroup version on this host: makes containers' groups, reaps stale ones."""

    name: str = ""
    problem: str | None = None  # why this host gives us no cgroups (the null backend only)

    def __init__(self, parent_dirs: tuple[str, ...]):
        self.parent_dirs = parent_dirs     # our `minictr` directory in each hierarchy

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {list(self.parent_dirs)}>"

    @abc.abstractmethod
    def check_limits(self, limits: Limits) -> None:
        """UnsupportedError if a limit needs a controller this host does not offer us."""

    @abc.abstractmethod
    def create(self, name: str, limits: Limits) -> Cgroup:
        """Create the group `name` (see `group_name()`) with `limits` applied; raises
        UnsupportedError if a limit needs a controller this host does not offer."""

    @abc.abstractmethod
    def open(self, name: str) -> Cgroup:
        """The group `name` as it exists now (for kill/remove of a group we did not create)."""

    def release(self) -> None:
        """Remove our `minictr` parents if no launcher has a group in them any more (rmdir
        refuses a non-empty one), so that a host where no container runs holds nothing of
        ours. A launcher creating a group at the same moment makes its parent again."""
        for parent in self.parent_dirs:
            try:
                os.rmdir(parent)
            except OSError:
                pass

    def reap_stale(self, grace: float = FOREIGN_GRACE) -> list[str]:
        """Kill and remove the groups whose owner launcher is dead; returns their names.

        Groups of live launchers (pytest-xdist runs several) are left alone. Only a launcher
        of our own PID namespace can be judged: its pid means the same here. One in another
        namespace (a CI job in a container that shares this host's cgroupfs, or the host seen
        from such a job) is never killed, whatever its pid is here; its group is removed once
        empty and older than `grace` seconds (when a PID namespace ends, the kernel kills all
        in it, so a dead namespace's groups are empty). A group that cannot be removed (a task
        stuck in the kernel) is reported as a warning, not raised: it belongs to nobody, and
        blocking every later launcher on it would help nobody.
        """
        here = own_pid_namespace()
        removed = []
        for name in sorted(self._group_names()):
            owner = owner_of(name)
            assert owner is not None  # _group_names lists our names alone
            if owner.pid_namespace == here:
                if not process_is_alive(owner.pid) and self._kill_and_remove(name):
                    removed.append(name)
            elif self._remove_if_empty_since(name, time.time() - grace):
                removed.append(name)
        return removed

    def _group_names(self) -> set[str]:
        """The names of our groups under every parent."""
        names: set[str] = set()
        for parent in self.parent_dirs:
            try:
                names.update(entry for entry in os.listdir(parent) if owner_of(entry))
            except FileNotFoundError:
                continue
        return names

    def _kill_and_remove(self, name: str) -> bool:
        group = self.open(name)
        try:
            group.kill()
            group.remove()
        except MinictrError as e:
            warnings.warn(f"stale cgroup left behind: {e}", RuntimeWarning, stacklevel=3)
            return False
        return True

    def _remove_if_empty_since(self, name: str, made_before: float) -> bool:
        """rmdir the group if it was made before `made_before` and holds no process (a pid
        of a namespace we cannot see reads 0 in cgroup.procs: it counts); once, quietly (a
        process that joins meanwhile makes rmdir fail, and the group is its owner's)."""
        paths = [path for path in self.open(name).paths if os.path.isdir(path)]
        try:
            if any(os.stat(path).st_mtime > made_before or list_processes(path)
                   for path in paths):
                return False
            for path in paths:
                os.rmdir(path)
        except FileNotFoundError:
            pass  # removed meanwhile (by its owner)
        except OSError:
            return False
        return True
