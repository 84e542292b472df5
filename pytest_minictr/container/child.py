"""The life of each process the launcher forks for a container, from fork to its plan's end:
a spare init (root), a keeper (without root), an exec helper. Each carries out a setup plan
(see `plan`) with the `executor`, and every function here ends in os._exit(): a forked child
must never return into the launcher. A failure before the command runs goes to the launcher on
the setup pipe (see `failure`).
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn

from pytest_minictr import protocol
from pytest_minictr.container import plan
from pytest_minictr.container.executor import Executor
from pytest_minictr.container.failure import exit_reporting, report_failure
from pytest_minictr.container.init import ChildFds, SignalProxy, die_with_parent
from pytest_minictr.host import linux

# What ps shows for a container's init, keeper and exec helper, as for the native core's: a
# fork of the launcher would show as its interpreter's name
INIT_NAME = "minictr-init"


def run_spare(channel: int, parent_pidfd: int, prepared_ahead: tuple[plan.Step, ...],
              keep: tuple[int, ...], signal_proxy: SignalProxy) -> NoReturn:
    """A spare init, PID 1 of its PID namespace: carries out the steps that need no spec now,
    then waits on `channel` for the rest of its plan and the container's descriptors. A
    failure is kept until there is a setup pipe to report it on. `signal_proxy`: inherited from
    the zygote, installed already; `keep`: fds the plan names (the user namespace's)."""
    code, fds = 1, None
    try:
        die_with_parent(parent_pidfd, (channel, *keep))
        linux.set_process_name(INIT_NAME)
        executor = Executor(signal_proxy=signal_proxy, **{"parent pidfd": parent_pidfd})
        try:
            executor.run(prepared_ahead)
            early_failure = None
        except Exception as failure:  # noqa: BLE001 - whatever it is, the caller hears of it
            early_failure = failure
        with socket.socket(fileno=channel) as sock:
            order = protocol.recv_payload(sock)
        if order is None:
            os._exit(0)  # discarded: the launcher is shutting down
        fds = ChildFds(*order[1][:5])
        if early_failure is not None:
            raise early_failure
        executor.slots["fds"] = fds
        if order[1][5:]:  # a pod's network namespace, to join (see plan.name_and_network)
            executor.slots["pod netns"] = order[1][5]
        executor.run(plan.decode(order[0]))  # its last step runs the command, and exits
    except BaseException as error:  # noqa: BLE001
        if fds is not None:
            report_failure(fds.setup, error)
    finally:
        os._exit(code)


def run_plan(steps: tuple[plan.Step, ...], fds: ChildFds, parent_pidfd: int,
             keep: tuple[int, ...] = ()) -> NoReturn:
    """A keeper (whose plan forks the init, which goes on with it) or an exec helper: the
    whole plan, in this child of the launcher. `keep`: fds the plan names besides `fds`."""
    exit_reporting(fds.setup, _carry_out, steps, fds, parent_pidfd, keep)


def _carry_out(steps: tuple[plan.Step, ...], fds: ChildFds, parent_pidfd: int,
               keep: tuple[int, ...]) -> None:
    die_with_parent(parent_pidfd, fds.all() + keep)
    linux.set_process_name(INIT_NAME)
    Executor(fds=fds, signal_proxy=None, **{"parent pidfd": parent_pidfd}).run(steps)
