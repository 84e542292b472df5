"""What a container is asked to be: validated once, at the edge, into frozen values.

`make_spec()` turns the loose keywords of `ContainerRuntime.run()` (and, through it, of the
marker and the CLI) into a `ContainerSpec`, or raises one `ConfigError` that names the keyword,
the value and the fix. Everything downstream (launcher, mounts, cgroups) trusts the spec.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from .errors import ConfigError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_OUTPUT_LIMIT = 64 * 1024 ** 2
NETWORK_MODES = ("none", "loopback")

_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "ib"):
        _SIZE_UNITS[_suffix] = 1024 ** _power
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# RFC 1123 labels; the kernel would take any 64 bytes, but other programs choke on the rest.
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")


@dataclass(frozen=True)
class Limits:
    """Resource limits enforced through the container's cgroup; None means unlimited."""

    memory: int | None = None          # bytes, swap excluded
    cpu_percent: float | None = None   # percent of one CPU (150 = one and a half)
    pids: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.cpu_percent, self.pids))


@dataclass(frozen=True)
class Mount:
    """An extra mount inside the container: a host path bound in, or a fresh tmpfs."""

    target: str
    source: str | None = None      # host path for a bind mount; None for a tmpfs
    read_only: bool = True
    size: int | None = None        # tmpfs size in bytes

    @classmethod
    def bind(cls, source: str | os.PathLike, target: str, read_only: bool = True) -> "Mount":
        return cls(target=target, source=os.fspath(source), read_only=read_only)

    @classmethod
    def tmpfs(cls, target: str, size: int | str | None = None) -> "Mount":
        return cls(target=target, read_only=False,
                   size=None if size is None else parse_size(size, "tmpfs size"))


@dataclass(frozen=True)
class ContainerSpec:
    """A validated request for one container. Paths inside the container are absolute."""

    rootfs: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str = "/"
    hostname: str = "minictr"
    network: str = "loopback"
    user_namespace: bool = False
    timeout: float | None = None
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    limits: Limits = field(default_factory=Limits)
    mounts: tuple[Mount, ...] = ()
    layer: str | None = None       # host dir keeping the writable layer; None: a fresh tmpfs

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies every field, a tenth of a millisecond
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["limits"] = vars(self.limits).copy()
        values["mounts"] = [vars(m).copy() for m in self.mounts]
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ContainerSpec":
        """Rebuild a spec sent over the launcher socket (already validated by the caller)."""
        values = dict(data)
        values["argv"] = tuple(values["argv"])
        values["env"] = tuple(tuple(pair) for pair in values["env"])
        values["limits"] = Limits(**values["limits"])
        values["mounts"] = tuple(Mount(**m) for m in values["mounts"])
        return cls(**values)


def parse_size(value: int | str, name: str = "size") -> int:
    """'64M' -> 67108864. Units are powers of 1024, like docker's: B, K, M, G, T (KB, KiB ok)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{name}={value!r}: expected bytes as an int or a string like '64M'")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{name}={value!r}: not a size (use e.g. '512K', '64M', '1G')")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{name}={value!r}: unknown unit {match.group(2)!r} (use K, M, G)")
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{name}={value!r}: must be positive")
    return size


def parse_cpus(value: float | int | str, name: str = "cpus") -> float:
    """Number of CPUs like `docker --cpus`: 0.5 is half of one CPU. Returns percent of one CPU."""
    try:
        cpus = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected a number of CPUs such as 0.5 or 2") from None
    return _check_cpu_percent(cpus * 100, name, value)


def _check_cpu_percent(percent: float, name: str, shown: Any) -> float:
    available = os.cpu_count() or 1
    if not math.isfinite(percent) or percent < 1:
        raise ConfigError(f"{name}={shown!r}: must be at least 1% of one CPU")
    if percent > available * 100:
        raise ConfigError(f"{name}={shown!r}: this host has only {available} CPUs")
    return float(percent)


def make_spec(
    image: str | os.PathLike,
    command: Sequence[str],
    *,
    cpu_limit: float | None = None,
    memory_limit: int | str | None = None,
    pids_limit: int | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str = "/",
    hostname: str = "minictr",
    network: str = "loopback",
    user: bool | None = None,
    mounts: Sequence[Mount] = (),
    output_limit: int | str | None = DEFAULT_OUTPUT_LIMIT,
    layer: str | os.PathLike | None = None,
) -> ContainerSpec:
    """Validate every keyword of `ContainerRuntime.run()`; one ConfigError names a bad one."""
    return ContainerSpec(
        rootfs=_check_rootfs(image),
        argv=_check_command(command),
        env=_check_env(env),
        cwd=_check_container_path(cwd, "cwd"),
        hostname=_check_hostname(hostname),
        network=_check_choice(network, "network", NETWORK_MODES),
        user_namespace=_check_user(user),
        timeout=_check_seconds(timeout, "timeout"),
        output_limit=DEFAULT_OUTPUT_LIMIT if output_limit is None
        else parse_size(output_limit, "output_limit"),
        limits=Limits(
            memory=None if memory_limit is None else parse_size(memory_limit, "memory_limit"),
            cpu_percent=None if cpu_limit is None else _check_cpu_limit(cpu_limit),
            pids=None if pids_limit is None else _check_positive_int(pids_limit, "pids_limit"),
        ),
        mounts=tuple(_check_mount(m) for m in _check_sequence(mounts, "mounts")),
        layer=None if layer is None else _check_host_dir(layer, "layer"),
    )


def _check_rootfs(image: Any) -> str:
    return _check_host_dir(image, "image", "rootfs", " (build one with RootfsBuilder().build)")


def _check_host_dir(value: Any, name: str, what: str = "directory", fix: str = "") -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(f"{name}={value!r}: expected the path of a {what} directory")
    path = os.fspath(value)
    if isinstance(path, bytes) or "\0" in path:
        raise ConfigError(f"{name}={value!r}: expected a str path without NUL bytes")
    if not os.path.isdir(path):
        problem = "does not exist" if not os.path.lexists(path) else "is not a directory"
        raise ConfigError(f"{name}={path!r}: {what} {problem}{fix}")
    return os.path.realpath(path)


def _check_command(command: Any) -> tuple[str, ...]:
    if isinstance(command, (str, bytes)):
        raise ConfigError(f"command={command!r}: expected a list of arguments, "
                          f"e.g. ['/bin/sh', '-c', {command!r}]")
    items = tuple(_check_sequence(command, "command"))
    if not items:
        raise ConfigError("command=[]: the command is empty")
    for item in items:
        if not isinstance(item, str) or "\0" in item:
            raise ConfigError(f"command item {item!r}: arguments must be str without NUL bytes")
    if not items[0]:
        raise ConfigError("command[0]='': the program name is empty")
    return items


def _check_env(env: Any) -> tuple[tuple[str, str], ...]:
    # A clean environment: the host's never leaks in; TERM is 'dumb' because output is captured.
    merged = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb"}
    if env is not None:
        if not isinstance(env, Mapping):
            raise ConfigError(f"env={env!r}: expected a mapping of names to values")
        for name, value in env.items():
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise ConfigError(f"env name {name!r}: must be a non-empty str without '=' or NUL")
            if not isinstance(value, str) or "\0" in value:
                raise ConfigError(f"env[{name!r}]={value!r}: values must be str without NUL")
            merged[name] = value
    return tuple(merged.items())


def _check_container_path(path: Any, name: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(f"{name}={path!r}: expected an absolute path inside the container")
    return os.path.normpath(path)


def _check_hostname(hostname: Any) -> str:
    if not isinstance(hostname, str) or not _HOSTNAME_RE.match(hostname) or len(hostname) > 64:
        raise ConfigError(f"hostname={hostname!r}: expected letters, digits, '-' and '.', "
                          "at most 64 characters")
    return hostname


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return value


def _check_user(user: Any) -> bool:
    if user is None:  # automatic: only a non-root caller needs a user namespace to mount
        return os.geteuid() != 0
    if not isinstance(user, bool):
        raise ConfigError(f"user={user!r}: expected True, False or None (automatic)")
    if not user and os.geteuid() != 0:
        raise ConfigError("user=False: without root, a container needs a user namespace")
    return user


def _check_seconds(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive number of seconds")
    return float(value)


def _check_cpu_limit(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"cpu_limit={value!r}: expected a percent of one CPU, e.g. 50")
    return _check_cpu_percent(float(value), "cpu_limit", value)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")
    return value


def _check_sequence(value: Any, name: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name}={value!r}: expected a list")
    return value


def _check_mount(mount: Any) -> Mount:
    if not isinstance(mount, Mount):
        raise ConfigError(f"mounts item {mount!r}: expected Mount.bind(...) or Mount.tmpfs(...)")
    target = _check_container_path(mount.target, "mount target")
    if target == "/":
        raise ConfigError("mount target '/': cannot mount over the container's root")
    source = mount.source
    if source is not None:
        if not isinstance(source, str) or "\0" in source or not os.path.isabs(source):
            raise ConfigError(f"mount source {source!r}: expected an absolute host path")
        if not os.path.exists(source):
            raise ConfigError(f"mount source {source!r}: does not exist on the host")
        source = os.path.realpath(source)
    return Mount(target=target, source=source, read_only=bool(mount.read_only), size=mount.size)
