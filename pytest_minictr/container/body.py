"""The life of a sandboxed test body, from the worker's fork to its report (see
`plugin.sandbox` for the pytest side, `body_plan` for its setup).

As root:    worker ── fork (into a spare's PID namespace) ──> body: joins the spare's cgroup
            and namespaces, the host's tree read-only, pivot_root, confinement, the test
Without root (no spares: a PID namespace needs a user namespace made first):
            worker ── fork ──> keeper: user namespace, the others
                                 └── fork ──> init (PID 1): stage, host tree, pivot_root
                                                └── fork ──> body: confinement, the test

The body is never PID 1: the kernel ignores signals a namespace's init sends itself, and a
test that kills itself (or segfaults) must die of it as it would in the worker. The init (the
spare, or ours) reaps what the body leaves; ours writes the body's wait status last on the
report pipe (as root the worker reaps the body itself). Every function here ends in
os._exit(): a forked copy of pytest must never return into the worker's session.

Nothing here outlives the worker: the body (as root) or the keeper dies with it, and our
init with the keeper (PR_SET_PDEATHSIG, each armed with a check that its parent still
lives); the kernel kills a PID namespace with its init. The same chain is how the launcher
kills a body at its timeout without a cgroup: it kills the keeper (see `launcher.sandboxes`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

from pytest_minictr.container.body_plan import BodyPlan
from pytest_minictr.container.executor import Executor
from pytest_minictr.container.failure import report_failure, write_line
from pytest_minictr.container.init import arm_parent_death_signal
from pytest_minictr.container.plan import Step


def run_sandboxed(plan: BodyPlan, report_fd: int, body: Callable[[], bytes],
                  worker: int) -> NoReturn:
    """In the worker's child: carry out `plan` and run `body` (which returns the report) in
    the body's process; each line on `report_fd` is JSON, the body's report a payload.
    `worker`: a pidfd of the worker, opened before the fork (we die with it)."""
    die_with(worker)  # the worker died: nothing to report to
    executor = Executor(report=report_fd)
    if not plan.rootless:  # root: the body joins a spare's namespaces, PID one included
        run_body(executor, plan.namespaces + plan.view + plan.confinement, report_fd, body)
    code = 1
    try:
        executor.run(plan.namespaces)
        fork_init()
        executor.run(plan.view)
        body_pid = os.fork()
        if body_pid == 0:
            run_body(executor, plan.confinement, report_fd, body)
        write_line(report_fd, {"status": reap_until(body_pid)})
        code = 0
    except BaseException as error:  # noqa: BLE001 - the worker hears of whatever it is
        report_failure(report_fd, error)
    finally:
        os._exit(code)


def fork_init() -> None:
    """Without root: this process (the keeper) made the user namespace and stays outside the
    PID one, waiting for its init (our child, PID 1 there, which returns here and goes on
    with the plan). The init dies with us, and everything in its namespace with it."""
    keeper = os.pidfd_open(os.getpid())
    init_pid = os.fork()
    if init_pid == 0:
        die_with(keeper)
        return
    os.close(keeper)
    _, status = os.waitpid(init_pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def die_with(parent: int) -> None:
    """SIGKILL us when `parent` (a pidfd of our parent, opened before the fork) dies; exit now
    if it died before that was armed. Armed first: a parent killed a moment after our fork
    must not leave us running, reparented to the host's init."""
    arm_parent_death_signal(parent)
    os.close(parent)


def run_body(executor: Executor, steps: tuple[Step, ...], report_fd: int,
             body: Callable[[], bytes]) -> NoReturn:
    code, me = 1, os.getpid()
    try:
        executor.run(steps)
        report = body()
        # a copy the body forked (and that did not exit) came back here too: only we report
        if os.getpid() == me:
            write_all(report_fd, report)
            code = 0
    except BaseException as error:  # noqa: BLE001
        if os.getpid() == me:
            report_failure(report_fd, error)
    finally:
        os._exit(code)


def reap_until(body_pid: int) -> int:
    """As PID 1: reap every child (orphans of the body are ours) until the body's end; its
    wait status."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == body_pid:
            return status


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
