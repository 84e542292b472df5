"""The caller's side of a sandboxed test body's cgroup: asked of the launcher before the fork,
watched by it after, its end (and what the kernel measured) read back here. See
`launcher.sandboxes`; the fork itself is `plugin.sandbox`'s."""

from __future__ import annotations

import json
import os
import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pytest_minictr.caller.client import LauncherClient
from pytest_minictr.spec import Limits

END_WAIT = 30.0  # seconds for the launcher's end event once our child is reaped


@dataclass(frozen=True)
class SandboxEnd:
    """How the body's cgroup ended, as the launcher saw it."""

    timed_out: bool = False
    oom_killed: bool = False
    memory_peak: int | None = None
    cpu_time: float | None = None
    pids_refused: int = 0
    lost: bool = False  # no event came (the launcher died): the figures are unknown


class SandboxLease:
    """One body's cgroup: `cgroup_procs` to join, `watch(pid)` once forked, `end()` after."""

    def __init__(self, client: LauncherClient, sandbox_id: str, limits: Limits,
                 timeout: float | None,
                 error_from_reply: Callable[[dict[str, Any]], BaseException]):
        self._client = client
        self.id = sandbox_id
        events_r, events_w = os.pipe2(os.O_CLOEXEC)
        try:
            reply = client.request({"op": "sandbox", "id": sandbox_id, "limits": vars(limits),
                                    "timeout": timeout}, [events_w])
        except BaseException:
            os.close(events_r)
            raise
        finally:
            os.close(events_w)
        if not reply["ok"]:
            os.close(events_r)
            raise error_from_reply(reply["error"])
        self._events = events_r
        self.cgroup_procs: tuple[str, ...] = tuple(reply["cgroup_procs"])
        self.init_pid: int | None = reply["init_pid"]  # as root: the spare init to join

    def watch(self, pid: int | None) -> None:
        """From now on the launcher watches `pid` (None: the fork failed; the group goes)."""
        self._client.request({"op": "watch", "id": self.id, "pid": pid})

    def end(self, wait: bool = True) -> SandboxEnd:
        """The figures; or, not `wait`ing, none (the launcher still cleans up after the body:
        a caller that needs no figures need not wait for that)."""
        try:
            if not wait:
                return SandboxEnd()
            if not select.select([self._events], [], [], END_WAIT)[0]:
                return SandboxEnd(lost=True)
            line = os.read(self._events, 65536)
        finally:
            os.close(self._events)
        return SandboxEnd(**json.loads(line)) if line else SandboxEnd(lost=True)
