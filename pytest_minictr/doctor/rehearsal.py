"""A dry run of the default container's setup, for `doctor`: the launcher's own steps, in the
launcher's order, in throwaway processes, reporting the first step that fails.

Run as its own process (`python -m pytest_minictr.doctor.rehearsal`, which prints one JSON line), so
that the caller, a pytest run with threads perhaps, is never forked. Nothing outlives it: the
namespaces and mounts go with its processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pytest_minictr.container import mounts, seccomp, security
from pytest_minictr.doctor.checks import Rehearsal
from pytest_minictr.errors import ContainerSetupError
from pytest_minictr.host import idmap, linux

TIMEOUT = 30  # seconds: a hung mount must not hang doctor


def rehearse() -> Rehearsal:
    """Run the rehearsal in a fresh interpreter; its outcome."""
    try:
        done = subprocess.run([sys.executable, "-m", "pytest_minictr.doctor.rehearsal"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        return Rehearsal("user namespace", f"the rehearsal did not report ({error})")
    if outcome.get("failed"):
        return Rehearsal(outcome["failed"], outcome.get("error", ""))
    return Rehearsal()


class _Failed(Exception):
    def __init__(self, step: str, error: BaseException):
        super().__init__(step)
        self.step = step
        self.error = getattr(error, "strerror", None) or str(error)


def _step(name: str, action, *args):
    try:
        return action(*args)
    except (OSError, ContainerSetupError) as error:
        raise _Failed(name, error) from None


def run() -> dict:
    """Our side (the launcher's): the user namespace and the PID namespace; the rest in its
    first process, PID 1, as an init does. Returns the outcome to print."""
    rootless = os.geteuid() != 0
    try:
        if rootless:
            _step("user namespace", linux.unshare, linux.CLONE_NEWUSER)
            _step("user namespace", idmap.map_self, os.geteuid(), os.getegid())
            userns = None
        else:
            userns = _step("user namespace", idmap.make_user_namespace)
        _step("mount namespace", linux.unshare, linux.CLONE_NEWNS | linux.CLONE_NEWPID)
    except _Failed as failed:
        return {"failed": failed.step, "error": failed.error}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        outcome = _as_init(rootless, userns)
        os.write(write, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as report:
        data = report.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"failed": "mount namespace",
                                          "error": "the container's init died"}


def _as_init(rootless: bool, userns: idmap.UserNamespace | None) -> dict:
    try:
        _step("mount namespace", mounts.prepare_stage, False)  # unshared by our parent
        _step("pivot_root", mounts.enter_stage)
        _step("/proc", mounts.mount_proc)
        os.mkdir("/lower")
        lower = os.open("/lower", os.O_PATH)
        _step("overlayfs", mounts.mount_overlay, lower, None, None, rootless)
        _step("pivot_root", mounts.enter_root, mounts.ROOT)
        if userns is not None:
            _step("user namespace", security.enter_user_namespace, userns.fd)
        if os.uname().machine in seccomp.ARCHITECTURES:
            _step("seccomp", linux.set_no_new_privs)
            _step("seccomp", linux.install_seccomp_filter, seccomp.host_filter())
    except _Failed as failed:
        return {"failed": failed.step, "error": failed.error}
    return {"failed": None}


if __name__ == "__main__":
    print(json.dumps(run()))
