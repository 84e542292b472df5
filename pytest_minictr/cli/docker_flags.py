"""Docker's spellings of `minictr run`, mapped onto the library's keywords: `-v` and
`--mount` (onto `mounts=`), `--env-file` (onto `env=`), `--name` (a container's
handle). Pure text to values; each error names the flag and what was typed."""

from __future__ import annotations

import os
import re

from pytest_minictr.errors import ConfigError
from pytest_minictr.sizes import parse_size
from pytest_minictr.spec import Mount

# Docker's rule for names; 12 hex digits stay ids (`ps` shows them), never names
NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
ID_LIKE = re.compile(r"[0-9a-f]{12}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


VOLUME_MODES = ("ro", "rw")


def volume_mount(text: str) -> Mount:
    """`-v HOST:CONTAINER[:ro|rw]`: a bind mount, read-write unless `:ro` (Docker's default)."""
    parts = text.split(":")
    mode = parts.pop() if len(parts) == 3 else "rw"
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"-v {text!r}: expected HOST:CONTAINER[:MODE], MODE one of "
                          f"{', '.join(VOLUME_MODES)}")
    if mode not in VOLUME_MODES:
        # Docker's z/Z (SELinux labels) and propagation modes have no meaning here
        raise ConfigError(f"-v {text!r}: mode {mode!r} is not supported: the modes are "
                          f"{' and '.join(VOLUME_MODES)}")
    source, target = parts
    if not os.path.isabs(source):
        raise ConfigError(f"-v {text!r}: {source!r} is not an absolute host path (minictr has "
                          "no named volumes: give a host directory or file)")
    return Mount.bind(source, target, read_only=mode == "ro")


def mount_option(text: str) -> Mount:
    """`--mount type=bind,source=/a,target=/b[,readonly]` or `type=tmpfs,target=/x
    [,tmpfs-size=16M]`: Docker's keys, of which those the library has a meaning for."""
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        fields[_MOUNT_KEYS.get(key, key)] = value if sep else "true"
    kind = fields.pop("type", "volume")
    target = fields.pop("target", None)
    if target is None:
        raise ConfigError(f"--mount {text!r}: target= is missing (where in the container)")
    if kind == "tmpfs":
        size = fields.pop("tmpfs-size", None)
        _refuse_extra(text, fields)
        return Mount.tmpfs(target, None if size is None else parse_size(size, "tmpfs-size"))
    if kind != "bind":
        raise ConfigError(f"--mount {text!r}: type={kind} is not supported (type=bind or "
                          "type=tmpfs)")
    source = fields.pop("source", None)
    read_only = fields.pop("readonly", "false")
    _refuse_extra(text, fields)
    if not source or not os.path.isabs(source):
        raise ConfigError(f"--mount {text!r}: source= must be an absolute host path")
    if read_only not in ("true", "false", "1", "0"):
        raise ConfigError(f"--mount {text!r}: readonly={read_only}: expected true or false")
    return Mount.bind(source, target, read_only=read_only in ("true", "1"))


_MOUNT_KEYS = {"src": "source", "dst": "target", "destination": "target", "ro": "readonly"}


def _refuse_extra(text: str, fields: dict) -> None:
    if fields:
        raise ConfigError(f"--mount {text!r}: unknown key {next(iter(fields))!r} (known: type, "
                          "source, target, readonly, tmpfs-size)")


def env_file(path: str) -> dict[str, str]:
    """`--env-file FILE`: NAME=VALUE lines (a NAME alone takes the host's value, as `-e NAME`
    does); blank lines and `#` comments skipped; values taken as written (no quotes removed)."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"--env-file {path!r}: {reason}") from None
    env = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not ENV_NAME.fullmatch(name):
            raise ConfigError(f"--env-file {path!r}, line {number}: {line!r}: expected "
                              "NAME=VALUE or NAME")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    return env


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ID_LIKE.fullmatch(name):
        raise ConfigError(f"--name {name!r}: expected letters, digits, '_', '.', '-' (starting "
                          "with a letter or digit, at most 64), not 12 hex digits (an id)")
    return name
