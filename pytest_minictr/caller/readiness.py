"""Containers as services, from the caller: their published addresses and readiness.

`wait_for_port` asks the launcher whether the port accepts a connection inside the
container's network namespace (its forwarder tries), `wait_for_output` searches what the
container wrote so far and goes on reading. Both give up with ContainerNotReadyError, which
says what was awaited, how the container ended if it did, and the tail of its stderr.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pytest_minictr import protocol
from pytest_minictr.caller.pods import Published, address_of
from pytest_minictr.caller.result import STDERR_TAIL, tail
from pytest_minictr.errors import ConfigError, ContainerNotReadyError, MinictrError
from pytest_minictr.validate import check_seconds

if TYPE_CHECKING:
    from pytest_minictr.caller.monitor import Monitor
    from pytest_minictr.caller.result import Result
    from pytest_minictr.caller.runtime import Container

# Seconds between two probes of a port: from 1 ms (a server that starts in 10 ms is seen at
# once), doubling to 20 ms (a probe is a request to the launcher and a connect).
FIRST_PROBE_INTERVAL, POLL_INTERVAL = 0.001, 0.02


class ServiceMethods:
    """What a Container offers as a server (mixed into `runtime.Container`)."""

    published: Published  # container port -> (host address, host port)
    # set by Container, which these methods are always called on
    id: str
    _result: Result | None
    _monitor: Monitor | None

    def address(self, port: int) -> tuple[str, int]:
        """(host address, host port) where the published container `port` is reached."""
        return address_of(self.published, port, f"container {self.id}")

    def wait_for_port(self, port: int, timeout: float = 10) -> None:
        """Return once `port` accepts a connection inside the container's network;
        ContainerNotReadyError if it does not within `timeout` seconds, or the container
        ends first."""
        wait_for_port(cast("Container", self), port, timeout)

    def wait_for_output(self, pattern: bytes, timeout: float = 10) -> re.Match:
        """The match of the bytes regex `pattern` in the container's stdout or stderr, so
        far or to come; ContainerNotReadyError as for wait_for_port."""
        return wait_for_output(cast("Container", self), pattern, timeout)

    def output_so_far(self) -> tuple[bytes, bytes]:
        """What the container wrote to stdout and stderr until now (kept, not consumed)."""
        source = self._result if self._result is not None else self._monitor
        return (source.stdout, source.stderr) if source is not None else (b"", b"")


def wait_for_port(container: Container, port: Any, timeout: Any) -> None:
    """Until `port` accepts a connection on the container's loopback."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"wait_for_port({port!r}): expected a port from 1 to 65535")
    awaited = f"port {port} to accept connections inside the container"

    def accepts() -> bool:
        try:
            reply = container._runtime._client.call(protocol.PROBE, id=container.id, port=port)
        except MinictrError:
            # Not ready: the container or its network has ended (how, _wait_until tells), or
            # its forwarder did not answer (asked again), or the launcher died (its monitor
            # then reports that).
            return False
        return reply["errno"] == 0
    _wait_until(container, accepts, awaited, timeout, on_output=False)


def wait_for_output(container: Container, pattern: Any, timeout: Any) -> re.Match:
    """Until `pattern` (a bytes regex) matches what the container wrote to stdout or stderr;
    the match."""
    try:
        regex = re.compile(pattern)
        regex.search(b"")
    except (TypeError, re.error) as error:
        raise ConfigError(f"wait_for_output({pattern!r}): expected a bytes regex such as "
                          f"rb'ready to accept' ({error})") from None
    found: list[re.Match] = []

    def matches() -> bool:
        stdout, stderr = container.output_so_far()
        match = regex.search(stdout) or regex.search(stderr)
        if match:
            found.append(match)
        return match is not None
    _wait_until(container, matches, f"output matching {regex.pattern!r}", timeout,
                on_output=True)
    return found[0]


def _wait_until(container: Container, ready: Callable[[], bool], awaited: str,
                timeout: Any, on_output: bool) -> None:
    """Until `ready()`; it is asked again after each output of the container (`on_output`)
    or after a growing interval."""
    seconds = check_seconds(timeout, "timeout")
    deadline = time.monotonic() + seconds
    interval = POLL_INTERVAL if on_output else FIRST_PROBE_INTERVAL
    while True:
        if container._result is None and ready():
            return
        if container._result is not None or container._ended_within(0):
            if ready():  # (what it wrote before its end may be what we wait for)
                return
            raise _not_ready(container, awaited, f"it ended first: {_how_it_ended(container)}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _not_ready(container, awaited, f"not within {seconds:g} s; it still runs")
        container._ended_within(min(interval, remaining), once=on_output)
        interval = min(interval * 2, POLL_INTERVAL)


def _not_ready(container: Container, awaited: str, why: str) -> ContainerNotReadyError:
    stderr = container.output_so_far()[1][-STDERR_TAIL:]
    ended = None if container._result is None else _how_it_ended(container)
    shown = tail(stderr).rstrip() or "(nothing)"
    return ContainerNotReadyError(
        f"container {container.id} {list(container.args)!r} is not ready: waited for "
        f"{awaited}, {why}; its stderr ends with:\n{shown}", awaited, ended, stderr)


def _how_it_ended(container: Container) -> str:
    result = container._result
    assert result is not None  # asked once the container has ended
    if result.timed_out:
        return "killed at its time limit"
    if result.oom_killed:
        return "killed by the OOM killer (memory limit)"
    if result.returncode < 0:
        try:
            return f"killed by {signal.Signals(-result.returncode).name}"
        except ValueError:
            return f"killed by signal {-result.returncode}"
    return f"exited with status {result.returncode}"

