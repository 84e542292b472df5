"""The one exception hierarchy of pytest-minictr: everything we raise is a `MinictrError`.

A message names the input that is wrong and, where there is one, the fix, because the user
reading it is usually looking at a failed CI log, not at our source.

The two errors that are also subprocess errors (`WaitTimeoutError`, `ContainerProcessError`)
live in `runtime`: importing subprocess here would pull threading into the launcher, whose
after-fork hook would run on every container start.
"""

from __future__ import annotations


class MinictrError(Exception):
    """Base class of every error pytest-minictr raises on purpose."""


class ConfigError(MinictrError, ValueError):
    """A keyword, option or value given by the user is invalid (raised before anything starts)."""


class RootfsError(MinictrError):
    """A root filesystem cannot be built or used (missing binary, library, interpreter)."""


class UnsupportedError(MinictrError):
    """This host (kernel, privileges, platform) cannot do what was asked."""


class LauncherError(MinictrError):
    """The launcher process died or answered something we do not understand."""


class RuntimeClosedError(LauncherError):
    """A `ContainerRuntime` was asked to start something after `close()`: its launcher is
    stopped, and a new one would be closed by no one."""


class ContainerNotFoundError(MinictrError, KeyError):
    """No container with that id is known to this runtime."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "container not found"


class ContainerSetupError(MinictrError):
    """The container's child failed before the command was executed (mount, chdir, exec...).

    `step` says what was being done, `errno` the kernel's answer (or None), `phase` which
    part of the setup it belongs to (one of `container.plan.PHASES`, where known).
    """

    def __init__(self, message: str, step: str = "", errno: int | None = None,
                 phase: str = ""):
        super().__init__(message)
        self.step = step
        self.errno = errno
        self.phase = phase


class CommandNotFoundError(ContainerSetupError):
    """The command does not exist (or is not executable) inside the container's root."""


class ContainerNotReadyError(MinictrError):
    """A service did not become ready (`wait_for_port`, `wait_for_output`) in time, or ended
    first. `awaited` says what was waited for, `ended` how the container ended (None: it
    still runs), `stderr_tail` the last of what it wrote to stderr."""

    def __init__(self, message: str, awaited: str = "", ended: str | None = None,
                 stderr_tail: bytes = b""):
        super().__init__(message)
        self.awaited = awaited
        self.ended = ended
        self.stderr_tail = stderr_tail
