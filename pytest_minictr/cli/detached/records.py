"""Records of detached containers (`minictr run -d`), kept on disk between commands, as runc
does: no daemon, one directory per container in the state directory.

    <state dir>/<id>/state.json   the record (written whole: temp file + rename)
    <state dir>/<id>/lock         flock()ed by whoever changes the record or the container
    <state dir>/<id>/stdout.log, stderr.log   the container's output
    <state dir>/<id>/stdout.times, stderr.times   when each line began (`logs --timestamps`)
    <state dir>/<id>/control      the Unix socket of its shim (see `shim`)
    <state dir>/names/<name>      a symlink to the id: `--name` (made atomically, so unique)

Wherever a command takes an id it takes a name, or an unambiguous prefix of an id (`resolve`).

The state directory is $MINICTR_STATE_DIR, else /run/minictr for root, else
$XDG_RUNTIME_DIR/minictr, else minictr-UID in the temp dir ($TMPDIR or /tmp: a login without
systemd's session has no XDG_RUNTIME_DIR). It must be ours and written by us alone: a /tmp
name is anyone's to make first, and records name sockets we connect to and files we read.

A record names the shim process by pid *and* start time (field 22 of /proc/PID/stat): a pid
the kernel has given to another process since is never taken for it. A record whose shim is
gone (killed, machine rebooted) reads as exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_minictr.cli.ends import shown_status
from pytest_minictr.errors import ConfigError, ContainerNotFoundError
from pytest_minictr.host.proc import read_stat

RECORD = "state.json"
NAMES = "names"
LOGS = ("stdout.log", "stderr.log")
ID_PATTERN = re.compile(r"[0-9a-f]{12}")
PREFIX_PATTERN = re.compile(r"[0-9a-f]{1,12}")


@dataclass(frozen=True)
class Record:
    id: str
    command: tuple[str, ...]
    created: float                  # epoch seconds
    rootfs: str = ""
    # what it runs on as the user named it: an image reference, a recipe, a rootfs directory
    image: str = ""
    options: dict = field(default_factory=dict)   # the run keywords (limits, network...)
    logs: tuple[str, ...] = ()      # where its stdout and stderr go
    shim_pid: int | None = None
    shim_started: int | None = None  # clock ticks after boot, from /proc/PID/stat
    init_pid: int | None = None     # host pid of the container's init
    status: str = "created"         # created | running | exited | stopped | timed_out
    returncode: int | None = None
    finished: float | None = None
    name: str | None = None         # --name
    remove: bool = False            # --rm: the shim removes the record once the command ends
    ports: tuple = ()               # [container port, host address, host port] published

    @property
    def alive(self) -> bool:
        """The shim that holds the container still runs (same pid, same start time)."""
        return (self.status in ("created", "running") and self.shim_pid is not None
                and process_start_time(self.shim_pid) == self.shim_started)

    @property
    def shown_status(self) -> str:
        if self.status in ("created", "running") and not self.alive:
            return "exited (shim gone)"
        return shown_status(self.status, self.returncode)


def state_dir() -> Path:
    if os.environ.get("MINICTR_STATE_DIR"):
        return Path(os.environ["MINICTR_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/run/minictr")
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isabs(runtime_dir):
        return Path(runtime_dir, "minictr")
    return Path(tempfile.gettempdir(), f"minictr-{os.geteuid()}")


def _check_private(root: Path) -> None:
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return  # made when the first record is
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(f"state directory {root}: not a directory of yours that only you may "
                          f"write (uid {st.st_uid}, {stat.filemode(st.st_mode)}); remove it, or "
                          "set XDG_RUNTIME_DIR or MINICTR_STATE_DIR to one")


def process_start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot); None if no such process runs (a zombie
    waiting for its parent to reap it runs no more)."""
    stat = read_stat(pid)
    return None if stat is None or stat.has_exited else stat.start_time


class Store:
    """The records under one state directory."""

    def __init__(self, root: Path | None = None):
        self.root = root or state_dir()
        _check_private(self.root)

    def path(self, container_id: str) -> Path:
        if not ID_PATTERN.fullmatch(container_id):
            raise ConfigError(f"container id {container_id!r}: expected 12 hex digits "
                              "(as `minictr ps` shows)")
        return self.root / container_id

    def resolve(self, reference: str) -> str:
        """The id of the container `reference` names, as Docker looks: its id, its --name,
        or a prefix of one id (a prefix of several is an error naming them)."""
        if ID_PATTERN.fullmatch(reference) and (self.root / reference).is_dir():
            return reference
        named = self._named(reference)
        if named is not None:
            return named
        matches = [i for i in self.ids() if i.startswith(reference)] \
            if PREFIX_PATTERN.fullmatch(reference) else []
        if len(matches) > 1:
            raise ConfigError(f"{reference!r} names more than one container: "
                              f"{', '.join(matches)} (give more of the id)")
        if not matches:
            raise ContainerNotFoundError(f"no container {reference!r} (`minictr ps --all` "
                                         "lists them)")
        return matches[0]

    def _named(self, name: str) -> str | None:
        """The id of the container called `name` (--name), if one is."""
        try:
            target = os.readlink(self.root / NAMES / name) if "/" not in name \
                and name not in ("", ".", "..") else ""
        except OSError:
            return None
        return target if ID_PATTERN.fullmatch(target) and (self.root / target).is_dir() \
            else None

    def ids(self) -> list[str]:
        """The ids of every record, whatever its state."""
        entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
        return [entry.name for entry in entries if ID_PATTERN.fullmatch(entry.name)]

    def new(self, command: tuple[str, ...], rootfs: str, options: dict, name: str | None,
            remove: bool, logs: bool, image: str = "") -> Record:
        """The record of a container about to start (`logs`: its output kept here), its
        --name claimed: ConfigError if another holds it, before anything starts."""
        container_id = secrets.token_hex(6)
        kept = tuple(str(self.root / container_id / log) for log in LOGS) if logs else ()
        record = Record(id=container_id, command=command, created=time.time(), rootfs=rootfs,
                        image=image, options=options, name=name, remove=remove, logs=kept)
        self.create(record)
        return record

    def create(self, record: Record) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(self.root)  # made meanwhile by someone else?
        if record.name is not None:
            self._claim_name(record.name, record.id)
        directory = self.path(record.id)
        directory.mkdir(mode=0o700)
        self.write(record)
        return directory

    def _claim_name(self, name: str, container_id: str) -> None:
        names = self.root / NAMES
        names.mkdir(mode=0o700, exist_ok=True)
        holder = self._named(name)
        if holder is not None:
            raise ConfigError(f"--name {name!r}: already names container {holder} "
                              f"(`minictr rm {name}` frees it)")
        with contextlib.suppress(FileNotFoundError):
            (names / name).unlink()  # a dangling name: its container was removed
        try:  # symlink() fails if another `run --name` took it meanwhile
            os.symlink(container_id, names / name)
        except FileExistsError:
            raise ConfigError(f"--name {name!r}: just taken by another container") from None

    def read(self, container_id: str) -> Record:
        path = self.path(container_id) / RECORD  # ConfigError names a malformed id
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ContainerNotFoundError(f"no container {container_id!r} (`minictr ps --all` "
                                         "lists them)") from None
        except ValueError as error:
            raise ContainerNotFoundError(f"container {container_id!r}: its record is "
                                         f"unreadable ({error}); `minictr rm` it") from None
        data["command"] = tuple(data["command"])
        data["logs"] = tuple(data.get("logs", ()))
        return Record(**data)

    def write(self, record: Record) -> None:
        """Replace the record whole: a reader sees the old one or the new one, never half."""
        directory = self.path(record.id)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".state-")
        with os.fdopen(fd, "w") as file:
            json.dump(asdict(record), file)
        os.replace(temp, directory / RECORD)

    def update(self, container_id: str, **changes: Any) -> Record:
        with self.locked(container_id):
            record = replace(self.read(container_id), **changes)
            self.write(record)
        return record

    @contextlib.contextmanager
    def locked(self, container_id: str) -> Iterator[None]:
        """Hold the record's lock: one change at a time (rm against a finishing shim...)."""
        try:
            fd = os.open(self.path(container_id) / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
        except FileNotFoundError:
            raise ContainerNotFoundError(f"no container {container_id!r}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def all(self) -> list[Record]:
        records = []
        for container_id in self.ids():
            try:
                records.append(self.read(container_id))
            except ContainerNotFoundError:
                continue  # being removed, or unreadable: `rm` deals with it
        return sorted(records, key=lambda r: r.created)

    def remove(self, container_id: str) -> None:
        with self.locked(container_id):
            record = self.read(container_id)
            if record.alive:
                raise ConfigError(f"container {container_id} is running: `minictr stop` it "
                                  "first, or `minictr rm --force`")
            shutil.rmtree(self.path(container_id))
            self.release_name(record)

    def release_name(self, record: Record) -> None:
        link = self.root / NAMES / (record.name or "")
        with contextlib.suppress(OSError):
            if record.name and os.readlink(link) == record.id:
                link.unlink()

    def wait_for(self, container_id: str, condition: Callable[[Record], bool],
                 timeout: float) -> Record:
        deadline = time.monotonic() + timeout
        while True:
            record = self.read(container_id)
            if condition(record) or time.monotonic() > deadline:
                return record
            time.sleep(0.01)
