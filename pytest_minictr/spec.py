"""What a container is asked to be: frozen values, checked before they are made.

`ContainerSpec` and its parts (`Limits`, `Mount`, `Security`) are made from checked values
(by `keywords.spec_from`, `keywords.make_spec`); everything downstream (launcher, mounts,
cgroups) trusts them. The checks themselves are in `validate` and `confinement`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pytest_minictr.ports import Port, as_dicts, from_dicts
from pytest_minictr.sizes import parse_size

# The PATH of a container's environment, and where the rootfs builder looks for its programs
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_OUTPUT_LIMIT = 64 * 1024 ** 2
# A clean environment: the host's never leaks in; TERM is 'dumb' because output is captured.
DEFAULT_ENV = (("PATH", DEFAULT_PATH), ("HOME", "/root"), ("TERM", "dumb"))


@dataclass(frozen=True)
class Limits:
    """Resource limits enforced through the container's cgroup; None means unlimited."""

    memory: int | None = None          # bytes, swap excluded
    cpus: float | None = None          # CPUs, like docker --cpus (1.5 = one and a half)
    pids: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.cpus, self.pids))


@dataclass(frozen=True)
class Mount:
    """An extra mount inside the container: a host path bound in, or a fresh tmpfs."""

    target: str
    source: str | None = None      # host path for a bind mount; None for a tmpfs
    read_only: bool = True
    size: int | None = None        # tmpfs size in bytes

    @classmethod
    def bind(cls, source: str | os.PathLike[str], target: str, read_only: bool = True) -> Mount:
        # not os.fspath(None): check_mounts() names a source that is not a path
        return cls(target=target, read_only=read_only,
                   source=os.fspath(source) if isinstance(source, os.PathLike) else source)

    @classmethod
    def tmpfs(cls, target: str, size: int | str | None = None) -> Mount:
        return cls(target=target, read_only=False,
                   size=None if size is None else parse_size(size, "tmpfs size"))


@dataclass(frozen=True)
class Security:
    """How far the command is confined beyond its namespaces (see the `security` module).
    The defaults are the strict ones; each field loosens one thing, by a name `confinement`
    knows."""

    seccomp: bool = True                     # the default filter (see the `seccomp` module)
    allow_syscalls: tuple[str, ...] = ()     # calls that filter lets through after all
    capabilities: tuple[str, ...] = ()       # kept on top of security.DEFAULT_CAPABILITIES
    rlimits: tuple[tuple[str, int, int], ...] = ()  # (name, soft, hard) over the defaults


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
    # seconds of CPU, the cgroup's count of every process in it (see launcher.cpu_watch)
    cpu_time_limit: float | None = None
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    kill_on_output_limit: bool = False  # a stream past output_limit kills the container
    limits: Limits = field(default_factory=Limits)
    mounts: tuple[Mount, ...] = ()
    layer: str | None = None       # host dir keeping the writable layer; None: a fresh tmpfs
    layer_size: int | None = None  # bytes the fresh tmpfs layer may hold; None: the kernel's
    security: Security = field(default_factory=Security)
    read_only: bool = False        # the root read-only (the layer unmounted); /tmp stays a tmpfs
    # `minictr run -t`: stdin is a console socket; the container opens a pty of its own
    # devpts, sends the master back on it, and the command gets the slave as its stdio
    terminal: bool = False
    ports: tuple[Port, ...] = ()   # published on the caller's side (see `ports`)
    pod: str | None = None         # the pod whose network namespace it shares
    run_as: tuple[int, int] | None = None  # (uid, gid) of the init and the command inside
    # An image's layer dirs, bottom first, stacked by overlay under the writable layer (rootfs
    # is then the top one, for what shows a container's root); (): rootfs alone.
    layers: tuple[str, ...] = ()
    stop_signal: int = 15          # what stop() sends first (an image's StopSignal)

    @property
    def lower_dirs(self) -> tuple[str, ...]:
        """The overlay's lower dirs, bottom first."""
        return self.layers or (self.rootfs,)

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies every field, a tenth of a millisecond
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["limits"] = vars(self.limits).copy()
        values["security"] = vars(self.security).copy()
        values["mounts"] = [vars(m).copy() for m in self.mounts]
        values["ports"] = as_dicts(self.ports)
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContainerSpec:
        """Rebuild a spec sent over the launcher socket (already validated by the caller)."""
        values = dict(data)
        values["argv"] = tuple(values["argv"])
        values["env"] = tuple(tuple(pair) for pair in values["env"])
        values["limits"] = Limits(**values["limits"])
        values["security"] = Security(
            seccomp=values["security"]["seccomp"],
            allow_syscalls=tuple(values["security"]["allow_syscalls"]),
            capabilities=tuple(values["security"]["capabilities"]),
            rlimits=tuple(tuple(limit) for limit in values["security"]["rlimits"]))
        values["mounts"] = tuple(Mount(**m) for m in values["mounts"])
        values["ports"] = from_dicts(values["ports"])
        values["run_as"] = None if values["run_as"] is None else tuple(values["run_as"])
        values["layers"] = tuple(values["layers"])
        return cls(**values)
