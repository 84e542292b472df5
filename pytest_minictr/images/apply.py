"""An image's config applied to one container, by Docker's rules: its `Env` under the
caller's, `Entrypoint` + `Cmd` (a command given replaces `Cmd`; an entrypoint given replaces
the image's, and its `Cmd` with it), `WorkingDir` unless a cwd is given, `User` (a name
looked up in the image's own /etc/passwd and /etc/group) unless a run_as is, `StopSignal`.

`run_fields` is what `keywords.spec_from` asks of an image: the spec's fields it sets."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_minictr import validate
from pytest_minictr.errors import ConfigError
from pytest_minictr.images.image import Image
from pytest_minictr.images.resolve import resolve
from pytest_minictr.protocol import FORWARDED_SIGNALS
from pytest_minictr.spec import DEFAULT_ENV

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def run_fields(image: Image | str, command: Sequence[str] | None,
               values: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's image-made fields: rootfs (the top layer), layers, argv, env (the image's
    over the defaults, the caller's `values["env"]` over both), cwd, run_as, stop_signal."""
    found = resolve(image, values.get("pull") or "missing")
    config = found.config
    if not found.layers:
        raise ConfigError(f"image {found.reference!r} has no layers")
    layers = tuple(os.fspath(layer) for layer in found.layers)
    run_as = values["run_as"] if values["run_as"] is not None or not config.user \
        else user_ids(layers, config.user)
    own = validate.check_env(env_of(config.env), "the image's Env")
    given = values.get("env") or {}
    # Docker's: HOME is the user's, from the image's passwd, unless the image or the caller
    # sets it
    home = {} if run_as is None or "HOME" in own or "HOME" in given \
        else {"HOME": home_of(layers, run_as[0])}
    return {
        "rootfs": layers[-1],
        "layers": layers,
        "argv": argv_of(found, command, values.get("entrypoint")),
        "env": tuple({**dict(DEFAULT_ENV), **home, **own, **given}.items()),
        "cwd": validate.check_container_path(config.working_dir, "the image's WorkingDir")
        if values["cwd"] == "/" and config.working_dir else values["cwd"],
        "run_as": run_as,
        "stop_signal": signal_number(config.stop_signal) if config.stop_signal
        else signal.SIGTERM,
    }


def argv_of(image: Image, command: Sequence[str] | None,
            entrypoint: Sequence[str] | None) -> tuple[str, ...]:
    """Docker's rule: the entrypoint (the one given, else the image's), then the command
    given, else the image's Cmd, unless an entrypoint was given (it resets Cmd)."""
    first = tuple(image.config.entrypoint if entrypoint is None else entrypoint)
    rest = tuple(command) if command else () if entrypoint is not None else image.config.cmd
    if not first + rest:
        raise ConfigError(f"image {image.reference!r} has no Entrypoint or Cmd: give a command")
    return first + rest


def env_of(items: Sequence[str]) -> dict[str, str]:
    """The image's "NAME=value" list; a name without '=' is set to "" (as Docker does)."""
    return dict((item.partition("=")[0], item.partition("=")[2]) for item in items if item)


def signal_number(text: str) -> int:
    """StopSignal as Docker writes it: "SIGQUIT", "QUIT" or "3"."""
    name = text.upper() if text.isdigit() or text.upper().startswith("SIG") \
        else f"SIG{text.upper()}"
    number = int(text) if text.isdigit() else getattr(signal.Signals, name, None)
    # the init passes it on to the command; SIGSTOP would stop the init itself
    if number not in (*FORWARDED_SIGNALS, signal.SIGKILL):
        raise ConfigError(f"the image's StopSignal {text!r} is no signal the container's "
                          "init can pass on")
    return int(number)


def user_ids(layers: Sequence[str], user: str) -> tuple[int, int]:
    """The image's User as (uid, gid): numbers as they are; a name looked up in the image's
    /etc/passwd (its gid the account's), a group in its /etc/group."""
    name, colon, group = user.partition(":")
    if name.isdigit():  # its account's group, if it has one; else 0, as Docker gives
        account = _entry(layers, "etc/passwd", name, by_number=True)
        uid, gid = int(name), int(account[3]) if account else 0
    else:
        account = _entry(layers, "etc/passwd", name)
        if account is None:
            raise ConfigError(f"the image's User {user!r}: no account {name!r} in its "
                              "/etc/passwd")
        uid, gid = int(account[2]), int(account[3])
    if colon:
        if group.isdigit():
            gid = int(group)
        else:
            entry = _entry(layers, "etc/group", group)
            if entry is None:
                raise ConfigError(f"the image's User {user!r}: no group {group!r} in its "
                                  "/etc/group")
            gid = int(entry[2])
    return uid, gid


def home_of(layers: Sequence[str], uid: int) -> str:
    """The home of the image's account `uid`; "/" for a uid it has no account for."""
    account = _entry(layers, "etc/passwd", str(uid), by_number=True)
    return account[5] if account is not None and len(account) > 5 and account[5] else "/"


def _entry(layers: Sequence[str], path: str, key: str,
           by_number: bool = False) -> list[str] | None:
    """The line of the image's passwd or group file whose name (or, `by_number`, id) is
    `key`, split on ':'."""
    found = file_in_layers(layers, path)
    if found is None:
        return None
    with open(found, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            fields = line.rstrip("\n").split(":")
            # (a group's fourth field is its members: only passwd has a number there)
            if len(fields) >= 4 and fields[2 if by_number else 0] == key \
                    and fields[2].isdigit() and (path == "etc/group" or fields[3].isdigit()):
                return fields
    return None


def file_in_layers(layers: Sequence[str], path: str) -> str | None:
    """Where the image's file `path` (relative) is, as the overlay would show it: the top
    layer that has it, unless a layer above deleted it (a whiteout, 0/0 char device) or made a
    directory on its way opaque."""
    parts = path.split("/")
    for layer in reversed(layers):
        opaque = False  # a directory on the way hides what the layers below have in it
        for depth in range(1, len(parts) + 1):
            here = os.path.join(layer, *parts[:depth])
            try:
                info = os.lstat(here)
            except FileNotFoundError:
                if opaque:
                    return None
                break  # not in this layer: look below
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                return None  # deleted here
            if depth == len(parts):
                return here if stat.S_ISREG(info.st_mode) else None
            if not stat.S_ISDIR(info.st_mode):
                return None  # a file or a link where the image has a directory on the way
            opaque = opaque or _is_opaque(here)
    return None


def _is_opaque(directory: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(directory, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False
