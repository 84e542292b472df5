"""The native zygote: `minictr-init` (see pytest_minictr.native), started once per launcher,
forks spare inits and runs keepers and exec helpers for it, none of them Python.

It is run from a sealed memfd copy of the program, as runc runs itself (CVE-2019-5736): a
container's root cannot reach the file its PID 1 runs (/proc/1/exe names "/memfd:minictr-init
(deleted)", no host path), nor write through it into the host's copy. Its command line names
fd numbers only, its environment is empty.

It speaks the launcher's framing (protocol.send_payload): an order is a JSON object, a spare's
({"spare": its prepared plan} with the spare's channel) or a whole plan to run in a child
({"run": plan, "at": [fd numbers]} with the child's five fds, then fds the plan names, which
the child puts at the numbers they have here); each is answered in order, {"pid": N} or
{"error": text, "errno": N}. Every child it forks has the launcher as its parent
(CLONE_PARENT), as the Python zygote's spares do.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable

from pytest_minictr import protocol
from pytest_minictr.container import plan
from pytest_minictr.container.init import ChildFds
from pytest_minictr.host.cgroups import Cgroup
from pytest_minictr.launcher.zygote import Zygote, ZygoteGone

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed_copy(program: str) -> int:
    """A memfd holding `program`, sealed against any change."""
    memfd = os.memfd_create("minictr-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(program, "rb") as source:
            data = source.read()
        while data:
            data = data[os.write(memfd, data):]
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


class NativeZygote(Zygote):
    """The launcher's side of the native zygote (the same answers as the Python one's)."""

    def __init__(self, program: str, parent_pidfd: int, keep: tuple[int, ...],
                 prepared_plan: Callable[[Cgroup], bytes]):
        """`prepared_plan(cgroup)`: what a spare in `cgroup` carries out before its spec
        comes, encoded; `keep`: fds the plans name that every child needs (the user
        namespace's)."""
        self._prepared_plan = prepared_plan
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        passed = (theirs.fileno(), parent_pidfd, *keep)
        memfd = sealed_copy(program)
        try:
            for fd in passed:
                os.set_inheritable(fd, True)
            # posix_spawn: vfork-style, nothing of the launcher copied; signals at default
            self.pid = os.posix_spawn(f"/proc/self/fd/{memfd}",
                                      ["minictr-init", "zygote", *map(str, passed)], {},
                                      setsid=True, setsigmask=())
        except BaseException:
            ours.close()
            raise
        finally:
            for fd in passed[1:]:
                os.set_inheritable(fd, False)
            theirs.close()
            os.close(memfd)
        self._sock = ours

    @property
    def replaceable(self) -> bool:
        """One found gone is replaced: its spares are our only way to keep Python out of
        containers, and starting one costs one posix_spawn. Not one that died before its first
        answer: it would die again (one dead zygote and one restart per container)."""
        return self.answered > 0

    def order(self, channel: int, cgroup: Cgroup) -> None:
        self._send(b'{"spare":' + self._prepared_plan(cgroup) + b"}", (channel,))

    def run(self, steps: tuple[plan.Step, ...], fds: ChildFds, keep: tuple[int, ...]) -> int:
        """Run a whole plan in a new child of ours (a keeper, an exec helper), given the
        container's five `fds` and the `keep` fds the plan names; its pid. Its answer comes
        after those to the spares ordered before: receive them first."""
        self._send(b'{"run":' + plan.encode(steps) + b',"at":' + json.dumps(list(keep)).encode()
                   + b"}", (*fds.all(), *keep))
        return self.receive()

    def _send(self, payload: bytes, fds: tuple[int, ...]) -> None:
        try:
            protocol.send_payload(self._sock, payload, fds)
        except OSError as error:
            raise ZygoteGone(str(error)) from None
