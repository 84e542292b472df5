"""A dry run of the default container's setup, for `doctor`: the launcher's own setup plan (see
`container.plan`), all of it but the command, carried out by the launcher's own executor in
throwaway processes, reporting the first step that fails.

Run as its own process (`python -m pytest_minictr.doctor.rehearsal`, which prints one JSON
line, read by `doctor.host.rehearse`), so that the caller, a pytest run with threads perhaps,
is never forked. Nothing outlives
it: the namespaces and mounts go with its processes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from pytest_minictr.container import plan
from pytest_minictr.container.child import run_plan
from pytest_minictr.container.init import ChildFds
from pytest_minictr.host import idmap, linux
from pytest_minictr.keywords import make_spec

# The doctor's finding that each phase of the plan stands for.
FINDING_OF_PHASE = {
    "user namespace": "user namespace", "join cgroup": "mount namespace",
    "namespaces": "mount namespace", "stage": "mount namespace", "/proc and /dev": "/proc",
    "layer": "overlayfs", "root": "overlayfs", "pivot_root": "pivot_root",
    "hostname and loopback": "pivot_root", "rlimits": "seccomp", "capabilities": "seccomp",
    "seccomp": "seccomp", "exec": "seccomp"}


def run() -> dict:
    """The launcher's part (as root: the user namespace, and a child that is PID 1 of a new
    PID namespace, as a spare is), then the default container's plan but its last step, over
    an empty rootfs. Returns the outcome to print."""
    rootfs = tempfile.mkdtemp(prefix="minictr-rehearsal-")
    try:
        spec = make_spec(rootfs, ["/rehearsal"])
        if os.geteuid() != 0:
            return _carry_out(plan.setup_plan(spec, plan.Where(rootless=True))[:-1])
        try:
            userns = idmap.make_user_namespace()
        except OSError as error:
            return {"failed": "user namespace", "error": error.strerror or str(error)}
        where = plan.Where(userns_fd=userns.fd, host_ids=(userns.host_uid, userns.host_gid))
        return _carry_out(plan.setup_plan(spec, where)[:-1], (userns.fd,))
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _carry_out(steps: tuple[plan.Step, ...], keep: tuple[int, ...] = ()) -> dict:
    """`steps` in a child (as root, PID 1 of a new PID namespace); the first failure."""
    setup_r, setup_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    stdio = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(3)]
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    own_pidfd = os.pidfd_open(os.getpid())
    fds = ChildFds(stdio[0], stdio[1], stdio[2], setup_w, status_w)
    try:
        if os.geteuid() == 0:
            pid = linux.fork_into_new_pid_namespace(own_pid_namespace)
        else:  # the plan's keeper makes the namespaces
            pid = os.fork()
    except OSError as error:
        return {"failed": "mount namespace", "error": error.strerror or str(error)}
    if pid == 0:
        run_plan(steps, fds, own_pidfd, keep)
    for fd in (setup_w, status_w, *stdio):
        os.close(fd)
    with os.fdopen(setup_r, "rb") as report:
        lines = report.read().splitlines()
    os.waitpid(pid, 0)
    os.close(status_r)
    for line in lines:
        reported = json.loads(line).get("error")
        if reported is not None:
            return {"failed": FINDING_OF_PHASE.get(reported.get("phase"), "mount namespace"),
                    "error": reported["message"]}
    return {"failed": None}


if __name__ == "__main__":
    print(json.dumps(run()))
