"""The value checkers: one user value in, the checked value out, or a `ConfigError` that names
the value as the user spelled it (`memory=`, `--minictr-memory=`, `memory_limit=`, `--memory=`).

Pure functions with no state, shared by every front end through the keyword schema
(`keywords`); the frozen values they feed are in `spec`. Nothing here starts anything.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_minictr import immutable
from pytest_minictr.errors import ConfigError
from pytest_minictr.sizes import MAX_SIZE, parse_size
from pytest_minictr.spec import Mount

NETWORK_MODES = ("none", "loopback")
EXPECTED_CPUS = "a number of CPUs such as 0.5 or 2"
# Bounds past which the kernel (or select()/poll() in the launcher) would refuse or overflow.
MAX_SECONDS = 10 ** 6              # about 11 days: any wait, timeout or grace
MIN_MEMORY = 4 * 1024 ** 2         # below this the container's own init cannot even start
# pids.max refuses more than PID_MAX_LIMIT (4194304, EINVAL), and the launcher adds one for
# the container's init (starter._with_room_for_the_init).
MAX_PIDS = 4194304 - 1
# execve() refuses (E2BIG) one argument or NAME=value string of this many bytes, its NUL
# included: the kernel's MAX_ARG_STRLEN, 32 pages.
MAX_ARG_STRLEN = 32 * os.sysconf("SC_PAGE_SIZE")

# RFC 1123 labels; the kernel would take any 64 bytes, but other programs choke on the rest.
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


# ---------------------------------------------------------------------------------------------
# Sizes, CPUs, counts, durations

def check_memory_limit(value: Any, name: str = "memory_limit") -> int:
    # The kernel takes 1M, then OOM-kills the container before its command runs, with no
    # output at all (or refuses with EBUSY, under the group's current usage).
    return size_of_at_least_4_mib(value, name, f" ({MIN_MEMORY} bytes), or the container is "
                                  "killed before it starts; use e.g. '64M'")


def check_layer_size(value: Any, name: str = "layer_size") -> int:
    return size_of_at_least_4_mib(value, name, " (the layer also holds the container's mount "
                                  "points)")


def size_of_at_least_4_mib(value: Any, name: str, why: str) -> int:
    size = parse_size(value, name)
    if size < MIN_MEMORY:
        raise ConfigError(f"{name}={value!r}: must be at least 4 MiB{why}")
    return size


def parse_cpus(value: float | int | str, name: str = "cpus") -> float:
    """Number of CPUs like `docker --cpus`: 0.5 is half of one CPU, 2 is two."""
    try:
        cpus = float(value) if not isinstance(value, bool) else math.nan
    except OverflowError:  # an int past float range: far more CPUs than any host has
        cpus = math.inf
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {EXPECTED_CPUS}") from None
    return _check_cpus(cpus, name, value, percent=False)


def check_cpu_percent(value: Any, name: str = "cpu_limit") -> float:
    """The seed API's `cpu_limit`: percent of one CPU (50 is half of one); as CPUs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r}: expected a percent of one CPU, e.g. 50")
    # float() overflows on a huge int, either sign
    percent = math.inf if value > 1e300 else -math.inf if value < -1e300 else float(value)
    return _check_cpus(percent / 100, name, value, percent=True)


def _check_cpus(cpus: float, name: str, shown: Any, percent: bool) -> float:
    """`cpus` (in CPUs) within what the kernel and this host allow; the message speaks the
    unit the value was given in (`percent`: of one CPU, the seed's cpu_limit)."""
    available = os.cpu_count() or 1
    # the CFS quota is counted in whole percents of its period: below one, nothing would run
    if not math.isfinite(cpus) or cpus * 100 < 1:
        least = "1 (percent of one CPU)" if percent else "0.01 CPUs (0.5 is half of one)"
        raise ConfigError(f"{name}={shown!r}: must be at least {least}")
    if cpus > available:
        most = f" ({available * 100} percent of one)" if percent else ""
        raise ConfigError(f"{name}={shown!r}: this host has only {available} CPUs{most}")
    return float(cpus)


def check_pids_limit(value: Any, name: str = "pids_limit") -> int:
    pids = check_positive_int(value, name)
    if pids > MAX_PIDS:
        raise ConfigError(f"{name}={value!r}: must be at most {MAX_PIDS} (the kernel's "
                          "PID_MAX_LIMIT, less one for the container's init); use None for "
                          "no limit")
    return pids


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")
    return value


def check_seconds(value: Any, name: str, allow_zero: bool = False) -> float:
    """A duration given by the user, as float seconds: finite, positive (or 0 with
    `allow_zero`, e.g. a stop grace) and at most MAX_SECONDS, past which select()/poll()
    timeouts overflow. ConfigError names `name` otherwise."""
    expected = "a number of seconds, 0 or more" if allow_zero else "a positive number of seconds"
    # Comparisons, not math.isfinite(): that one raises OverflowError on a huge int.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r}: expected {expected}")
    if value > MAX_SECONDS:
        raise ConfigError(f"{name}={value!r}: must be at most {MAX_SECONDS} seconds "
                          f"(about {MAX_SECONDS // 86400} days)")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Strings the kernel takes: names, paths, arguments, the environment

def check_hostname(hostname: Any, name: str = "hostname") -> str:
    # fullmatch: '$' would let a trailing newline through. The pattern is ASCII-only, so it
    # also keeps out what os.fsencode() cannot encode.
    if not isinstance(hostname, str) or not _HOSTNAME_RE.fullmatch(hostname) \
            or len(hostname) > 64:
        raise ConfigError(f"{name}={hostname!r}: expected letters, digits, '-' and '.', "
                          "at most 64 characters")
    return hostname


def check_network(value: Any, name: str = "network") -> str:
    if value not in NETWORK_MODES:
        raise ConfigError(f"{name}={value!r}: expected one of "
                          f"{', '.join(map(repr, NETWORK_MODES))}")
    return str(value)


def check_encodable(value: str, name: str) -> None:
    """The kernel takes bytes: a str that os.fsencode() cannot turn into them (a lone
    surrogate such as '\\ud800') would fail late, in the launcher or the container."""
    try:
        os.fsencode(value)
    except UnicodeEncodeError as error:
        bad = value[error.start:error.end]
        raise ConfigError(f"{name}={value!r}: {bad!r} at index {error.start} cannot be encoded "
                          f"for the kernel ({error.reason}); strings from os.fsdecode() or "
                          "os.listdir() are fine") from None


def check_exec_string(value: str, name: str, prefix: str = "") -> None:
    """A string execve() would refuse, with E2BIG, late, naming no argument."""
    size = len(os.fsencode(prefix + value)) + 1
    if size > MAX_ARG_STRLEN:
        raise ConfigError(f"{name}={value[:20]!r}...: {size} bytes, past the kernel's limit "
                          f"of {MAX_ARG_STRLEN} on one argument or NAME=value string "
                          "(MAX_ARG_STRLEN); pass big data as input= or in a file")


def check_container_path(path: Any, name: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(f"{name}={path!r}: expected an absolute path inside the container")
    check_encodable(path, name)
    # normpath keeps a leading '//' (POSIX leaves it implementation-defined); Linux does not
    # care, but '//proc' must not slip past the checks that compare paths with '/proc'.
    return "/" + os.path.normpath(path).lstrip("/")


def check_host_dir(value: Any, name: str, what: str = "directory", fix: str = "") -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(f"{name}={value!r}: expected the path of a {what} directory")
    path = os.fspath(value)
    if isinstance(path, bytes) or "\0" in path:
        raise ConfigError(f"{name}={value!r}: expected a str path without NUL bytes")
    check_encodable(path, name)
    if not os.path.isdir(path):
        problem = "does not exist" if not os.path.lexists(path) else "is not a directory"
        raise ConfigError(f"{name}={path!r}: {what} {problem}{fix}")
    return os.path.realpath(path)


def check_prepared_rootfs(value: Any, name: str = "rootfs") -> str:
    """A rootfs directory prepared beforehand (the plugin's rootfs= and --minictr-rootfs),
    '~' expanded: it must hold something."""
    # here, not at the top: the launcher imports this module, and pathlib with it would be
    # more memory to copy into every container it forks
    from pathlib import Path
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={value!r}: expected the path of a rootfs directory")
    try:
        path = Path(value).expanduser()
    except (RuntimeError, ValueError):  # '~nosuchuser', '~\0', '~\ud800'
        raise ConfigError(f"{name}={str(value)!r}: no such user, so no home directory to "
                          "expand '~' to") from None
    if not os.path.isdir(path):  # not path.is_dir(): it raises ENAMETOOLONG
        raise ConfigError(f"{name}={str(value)!r}: no such directory")
    if not any(path.iterdir()):
        raise ConfigError(f"{name}={str(value)!r}: the directory is empty (build one with "
                          "`minictr rootfs build --bin sh DEST`)")
    return str(path.resolve())


def is_within(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def check_command(command: Any) -> tuple[str, ...]:
    if isinstance(command, (str, bytes)):
        raise ConfigError(f"command={command!r}: expected a list of arguments, "
                          f"e.g. ['/bin/sh', '-c', {command!r}]")
    items = tuple(check_sequence(command, "command"))
    if not items:
        raise ConfigError("command=[]: the command is empty")
    for index, item in enumerate(items):
        if not isinstance(item, str) or "\0" in item:
            raise ConfigError(f"command item {item!r}: arguments must be str without NUL bytes")
        check_encodable(item, f"command[{index}]")
        check_exec_string(item, f"command[{index}]")
    if not items[0]:
        raise ConfigError("command[0]='': the program name is empty")
    return items


def check_env(env: Any, name: str = "env") -> dict[str, str]:
    """Names and values the container's environment can hold (merged over the defaults, or a
    container's own environment, by the spec)."""
    if not isinstance(env, Mapping):
        raise ConfigError(f"{name}={env!r}: expected a mapping of names to values")
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(f"{name} name {key!r}: must be a non-empty str without '=' or NUL")
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"{name}[{key!r}]={value!r}: values must be str without NUL")
        check_encodable(key, f"{name} name")
        check_encodable(value, f"{name}[{key!r}]")
        check_exec_string(value, f"{name}[{key!r}]", prefix=f"{key}=")
    return dict(env)


def check_user(user: Any, name: str = "user") -> bool:
    """True (the default, None): container root is an unprivileged uid of the host. False:
    container root is host root, for a test that needs it (and a caller that is root)."""
    if user is None:
        return True
    if not isinstance(user, bool):
        raise ConfigError(f"{name}={user!r}: expected True, False or None (default: True)")
    if not user and os.geteuid() != 0:
        raise ConfigError(f"{name}=False: without root, a container needs a user namespace")
    return user


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected True or False")
    return value


def check_sequence(value: Any, name: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name}={value!r}: expected a list")
    return value


def check_binaries(value: Any, name: str = "binaries") -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
            not all(isinstance(b, str) and b for b in value):
        raise ConfigError(f"{name}={value!r}: expected a list of program names")
    return tuple(value)


def check_writable(value: Any, name: str = "writable") -> tuple[str, ...]:
    """Host paths a sandboxed test body may write: absolute, existing (a mount point cannot be
    made in the read-only host tree), by their real paths (a symlink would be bound as its
    target anyway)."""
    paths = []
    for path in check_sequence(value, name):
        if not isinstance(path, (str, os.PathLike)) or not os.path.isabs(os.fspath(path)) \
                or "\0" in os.fspath(path):
            raise ConfigError(f"{name}={value!r}: {path!r} is not an absolute host path")
        check_encodable(os.fspath(path), name)
        if not os.path.exists(path):
            raise ConfigError(f"{name}={value!r}: {os.fspath(path)!r} does not exist on the host"
                              " (create it first, e.g. in a fixture)")
        paths.append(os.path.realpath(path))
    return tuple(paths)


def check_pod(value: Any, name: str = "pod") -> str:
    """A pod of this runtime (`ContainerRuntime.pod()`), as its id."""
    pod_id = getattr(value, "pod_id", None)
    if not isinstance(pod_id, str):
        raise ConfigError(f"{name}={value!r}: expected a pod made by runtime.pod()")
    return pod_id


# ---------------------------------------------------------------------------------------------
# The writable layer and extra mounts

# Mount points the container gets from us (plan.build_root): mounting over or inside them
# would hide or break our /proc and /dev; below /tmp is fine, /tmp itself would hide ours.
OWN_MOUNTS = ("/proc", "/dev")
OWN_MOUNT_POINTS = (*OWN_MOUNTS, "/tmp")


def check_layer_dir(value: Any, name: str = "layer") -> str:
    """An existing host directory, as given: its real path is compared with the rootfs's
    (and kept in the spec) once both are known (`check_layer_apart`)."""
    check_host_dir(value, name)
    return str(os.fspath(value))


def check_layer_apart(layer: str, rootfs: str) -> str:
    """The layer's real path, which must be apart from the rootfs's."""
    # overlayfs would write upper/ and work/ into the base every container shares (or refuse
    # the overlap with ELOOP, late, inside the container): compare real paths here instead.
    real = os.path.realpath(layer)
    if real == rootfs or is_within(real, rootfs) or is_within(rootfs, real):
        where = ("is the rootfs" if real == rootfs else "is inside the rootfs"
                 if is_within(real, rootfs) else "contains the rootfs")
        raise ConfigError(f"layer={layer!r}: {where} (image={rootfs!r}); the "
                          "writable layer must be a directory apart from it, e.g. "
                          "tempfile.mkdtemp()")
    return real


def check_mounts(mounts: Any, name: str = "mounts") -> tuple[Mount, ...]:
    return tuple(_check_mount(m) for m in check_sequence(mounts, name))


def _check_mount(mount: Any) -> Mount:
    if not isinstance(mount, Mount):
        raise ConfigError(f"mounts item {mount!r}: expected Mount.bind(...) or Mount.tmpfs(...)")
    target = _check_mount_target(mount.target)
    if not isinstance(mount.read_only, bool):  # 'no' would be truthy: a silent read-only
        raise ConfigError(f"mount read_only={mount.read_only!r} (on {target!r}): "
                          "expected True or False")
    if mount.source is None:
        _check_tmpfs(mount, target)
        return Mount(target=target, read_only=False, size=mount.size)
    source = mount.source
    if not isinstance(source, str) or "\0" in source or not os.path.isabs(source):
        raise ConfigError(f"mount source {source!r}: expected an absolute host path")
    check_encodable(source, "mount source")
    if not os.path.exists(source):
        raise ConfigError(f"mount source {source!r}: does not exist on the host")
    if mount.size is not None:
        raise ConfigError(f"mount size={mount.size!r} (on {target!r}): only a tmpfs has a size; "
                          f"a bind mount of {source!r} shows it as it is (drop size)")
    real = os.path.realpath(source)
    shared = None if mount.read_only else immutable.shared_tree_of(real)
    if shared is not None:
        raise ConfigError(f"mount source {source!r}: writable bind of {shared}, which every "
                          "container made from it shares (the rootfs cache or the image "
                          "store); bind it read-only, or a copy")
    return Mount(target=target, source=real, read_only=mount.read_only)


def _check_mount_target(value: Any) -> str:
    target = check_container_path(value, "mount target")
    if ".." in value.split("/"):
        # Lexical normalization would be wrong wherever a component is a symlink in the
        # rootfs, and where it really points is only known inside the container.
        raise ConfigError(f"mount target {value!r}: '..' is not allowed; give the path "
                          f"without it, e.g. {target!r}")
    if target == "/":
        raise ConfigError("mount target '/': cannot mount over the container's root")
    for own in OWN_MOUNT_POINTS:
        if target == own or (own in OWN_MOUNTS and is_within(target, own)):
            what = "is" if target == own else "is inside"
            raise ConfigError(f"mount target {value!r}: {what} {own}, which the container "
                              f"gets from minictr; mount somewhere else"
                              + (" (below /tmp is fine, e.g. '/tmp/data')" if own == "/tmp"
                                 else ""))
    return target


def _check_tmpfs(mount: Mount, target: str) -> None:
    size = mount.size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                             or not 0 < size <= MAX_SIZE):
        raise ConfigError(f"mount size={size!r} (on {target!r}): expected a positive int of "
                          f"bytes, at most 2**62; Mount.tmpfs({target!r}, size='16M') parses "
                          "units")
    if mount.read_only:
        # mounts.py never remounts a tmpfs read-only: an empty read-only dir would be useless.
        raise ConfigError(f"mount read_only=True (on {target!r}): a tmpfs starts empty and is "
                          f"always writable; use Mount.tmpfs({target!r})")
