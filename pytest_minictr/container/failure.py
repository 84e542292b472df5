"""How a container's child tells the launcher what went wrong before its command ran: a
`ContainerSetupError` naming the step (and the sub-step, inside a step of several calls),
sent as one JSON line on the close-on-exec setup pipe, whose end of file, once every copy is
closed, means the command runs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from pytest_minictr import protocol
from pytest_minictr.errors import ContainerSetupError

T = TypeVar("T")


def attempt(step: str, function: Callable[..., T], *args: Any) -> T:
    """Run one part of a setup step; an OSError becomes a ContainerSetupError naming it."""
    try:
        return function(*args)
    except OSError as error:
        raise ContainerSetupError(f"{step}: {error.strerror or error}", step,
                                  error.errno) from None


def report_failure(fd: int, error: BaseException) -> None:
    if isinstance(error, ContainerSetupError):
        failure = error
    elif isinstance(error, OSError):
        failure = ContainerSetupError(str(error), "setup", error.errno)
    else:
        failure = ContainerSetupError(f"{type(error).__name__}: {error}", "setup")
    try:
        write_line(fd, {"error": protocol.error_fields(failure)})
    except OSError:
        pass  # nobody listens any more: the launcher has gone


def exit_reporting(setup_fd: int, work: Callable[..., object], *args: Any) -> NoReturn:
    """`work(*args)` in a forked child, which then exits: it must never return into the
    launcher. Whatever `work` raises, KeyboardInterrupt and SystemExit included, goes to the
    setup pipe: the launcher would otherwise see a child die and not know why."""
    code = 1
    try:
        work(*args)
        code = 0
    except BaseException as error:  # noqa: BLE001
        report_failure(setup_fd, error)
    finally:
        os._exit(code)


def write_line(fd: int, message: dict[str, Any]) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")
