"""The library's front door: `ContainerRuntime.run()` starts a container, `Container.wait()`
gives its `Result`.

Data flows one way: keywords -> `keywords.make_spec` (validated, frozen) -> the launcher (fork,
namespaces, mounts, exec) -> `Monitor` (pipes, the launcher's end report) -> `Result`.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import os
import secrets
import signal
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pytest_minictr import confinement, errors, keywords, protocol
from pytest_minictr.caller import pods, readiness
from pytest_minictr.caller.client import LauncherClient
from pytest_minictr.caller.monitor import Monitor
from pytest_minictr.caller.pipes import Pipes
from pytest_minictr.caller.result import ContainerStats, ContainerStatus, Result, WaitTimeoutError
from pytest_minictr.caller.sandbox import SandboxLease, SandboxOrder
from pytest_minictr.errors import (
    ConfigError,
    ContainerNotFoundError,
    LauncherError,
    RuntimeClosedError,
)
from pytest_minictr.keywords import make_exec_spec, make_spec
from pytest_minictr.protocol import FORWARDED_SIGNALS
from pytest_minictr.spec import ContainerSpec, Limits
from pytest_minictr.validate import check_seconds

if TYPE_CHECKING:  # (a front end's value: named for the annotations only)
    from pytest_minictr.images.image import Image

DEFAULT_STOP_GRACE = 5.0
_FINISHED_KEPT = 1024   # statuses of collected containers remembered for runtime.status(id)
_ABORT_WAIT = 30.0      # seconds to wait for a killed container's end after an interrupt
_STATUS_OF_END = {"timeout": ContainerStatus.TIMED_OUT, "cpu_time": ContainerStatus.TIMED_OUT,
                  "stop": ContainerStatus.STOPPED}  # by the launcher's `ended_by`
# RLIMIT_CPU counts sampled ticks, rusage the scheduler's precise time: a process killed at
# its hard limit of 1 s was measured at 0.9 s here (a VM); a tenth more is kept in reserve.
_RLIMIT_CPU_SHARE = 0.8


class Container(readiness.ServiceMethods):
    """A running (or finished) container. Use `wait()` for its Result; `stop()` to end it;
    `exec()` to run another command in it while it runs; `stats()` for its figures now;
    `address(port)`, `wait_for_port()`, `wait_for_output()` for a server (`readiness`)."""

    def __init__(self, runtime: ContainerRuntime, container_id: str, pid: int,
                 spec: ContainerSpec, monitor: Monitor, exec_of: str | None = None,
                 published: pods.Published | None = None):
        self.id = container_id
        self.published = published or {}  # container port -> (host address, host port)
        self.pid = pid              # host pid of the container's init (of an exec: its command)
        self.exec_of = exec_of      # an exec's container id
        self.spec = spec
        self.args = spec.argv
        self._runtime = runtime
        self._monitor: Monitor | None = monitor  # None once the Result holds the output
        self._lock = threading.Lock()
        self._result: Result | None = None
        self._status = ContainerStatus.RUNNING

    def __repr__(self) -> str:
        return f"<Container {self.id} {self._status.value} {list(self.args)!r}>"

    @property
    def status_now(self) -> ContainerStatus:
        """The status as last seen, without looking again."""
        return self._status

    @property
    def status(self) -> ContainerStatus:
        """Current status; looks at the container without blocking."""
        if self._result is None and self._lock.acquire(blocking=False):
            try:
                self._collect(deadline=time.monotonic())
            finally:
                self._lock.release()
        return self._status

    def wait(self, timeout: float | None = None) -> Result:
        """Wait for the end and return the Result. With `timeout`, raise WaitTimeoutError if
        the container still runs then (it keeps running). An interrupt (Ctrl-C) kills it."""
        deadline = None if timeout is None \
            else time.monotonic() + check_seconds(timeout, "timeout", allow_zero=True)
        with self._lock:
            if self._result is None and not self._collect(deadline):
                assert timeout is not None  # only a deadline ends _collect() early
                raise WaitTimeoutError(list(self.args), timeout)
            assert self._result is not None  # _collect() made it
            return self._result

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> Result:
        """SIGTERM to the command, then after `grace` seconds SIGKILL of everything inside."""
        grace = check_seconds(grace, "grace", allow_zero=True)
        if self._result is None:
            self._request_end(grace)
        return self.wait()

    def send_signal(self, signum: int) -> None:
        """Send a signal to the command (through the container's init, which forwards it).
        SIGKILL kills the whole container; SIGSTOP cannot be passed on (it would stop the
        init: an init cannot forward what it cannot catch)."""
        signum = _check_signal(signum)
        if signum == signal.SIGKILL:
            self.kill()
        elif self._result is None:
            self._runtime._client.call(protocol.SIGNAL, id=self.id, signum=signum)

    def kill(self) -> Result:
        return self.stop(grace=0)

    def exec(self, cmd: Sequence[str], input: bytes | None = None,
             timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        """Run another command in this running container: in its namespaces, cgroup and root,
        confined as its first command is, in its cwd and environment (`env` added). Returns
        its Result (memory figures are the container's: see stats()). Raises
        ContainerNotFoundError once the container has ended."""
        spec = make_exec_spec(self.spec, cmd, env, timeout)
        return self._runtime._launch(spec, _check_input(input, None), None, None, None,
                                     exec_of=self.id).wait()

    def _ended_within(self, seconds: float, once: bool = False) -> bool:
        """Read its output for up to `seconds` (`once`: or until some came); True once it
        has ended. (Another thread may be reading it meanwhile, a service's drain: then that
        one reads, and we only wait.)"""
        deadline = time.monotonic() + seconds
        if not self._lock.acquire(timeout=seconds):
            return self._result is not None
        try:
            return self._result is not None or self._collect(deadline, once)
        finally:
            self._lock.release()

    def stats(self) -> ContainerStats:
        """Memory now and at its peak, CPU time so far, processes, limits: from the cgroup.
        ContainerNotFoundError once the container has ended."""
        reply = self._runtime._client.call(protocol.STATS, id=self.id)
        return ContainerStats(limits=self.spec.limits, **reply["stats"])

    def _request_end(self, grace: float) -> None:
        try:
            self._runtime._client.call(protocol.STOP, id=self.id, grace=grace)
        except LauncherError:
            pass  # a dead launcher took the container with it; wait() reports that

    def _collect(self, deadline: float | None, once: bool = False) -> bool:
        assert self._monitor is not None  # called only while there is no Result
        try:
            if not self._monitor.pump(deadline, once):
                return False
        except BaseException:
            self._abort()
            raise
        monitor, self._monitor = self._monitor, None  # the Result holds the output from now on
        event = monitor.event
        if event is None:
            self._status = ContainerStatus.EXITED
            self._runtime._forget(self)
            raise LauncherError(f"the minictr launcher died while container {self.id} ran; "
                                "the container was killed with it")
        self._status = _STATUS_OF_END.get(event["ended_by"], ContainerStatus.EXITED)
        self._result = Result(
            args=self.args, returncode=event["returncode"], stdout=monitor.stdout,
            stderr=monitor.stderr, timed_out=event["ended_by"] == "timeout",
            output_truncated=monitor.truncated, wall_time=event["wall_time"],
            cpu_time=event.get("cpu_time"), memory_peak=event.get("memory_peak"),
            oom_killed=event.get("oom_killed"), container_id=self.id,
            cpu_time_exceeded=_out_of_cpu_time(self.spec, event))
        self._runtime._forget(self)
        return True

    def _abort(self) -> None:
        """The caller was interrupted while waiting: kill the container and wait for its end,
        so that an interrupted test run leaves nothing behind."""
        if self._monitor is None or self._monitor.finished:
            return
        self._request_end(grace=0)
        try:
            self._monitor.pump(time.monotonic() + _ABORT_WAIT)
        finally:
            self._monitor.close()
            self._runtime._forget(self)


class _RuntimeLife(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"  # its launcher stopped: nothing new starts (see RuntimeClosedError)


class ContainerRuntime:
    """Starts containers through one launcher process of its own; use as a context manager
    or call `close()` (also done at interpreter exit) to end what still runs. A closed
    runtime starts nothing more: it raises `RuntimeClosedError`."""

    def __init__(self) -> None:
        self._client = LauncherClient()
        self._lock = threading.Lock()
        self._life = _RuntimeLife.OPEN
        # Weak: a container nobody refers to any more is not kept alive (nor its pipes, which
        # it could block on) by us; the launcher still ends it at its time limit or at close().
        self._running: weakref.WeakValueDictionary[str, Container] = weakref.WeakValueDictionary()
        self._finished: OrderedDict[str, ContainerStatus] = OrderedDict()
        self._issued: set[str] = set()
        self._ahead: SandboxOrder | None = None  # see sandbox_ahead
        _open_runtimes.add(self)

    def __enter__(self) -> ContainerRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @keywords.with_library_keywords
    def run(self, image: str | os.PathLike | Image, command: Sequence[str] | None = None, *,
            input: bytes | None = None, stdin: Any = None, stdout: Any = None,
            stderr: Any = None, **keywords: Any) -> Container:
        """Start `command` in a new container on the root filesystem `image`; returns at once.
        Without `command`, the image's default (the `command` of the recipe it was built
        from, e.g. recipe="redis"). A string that names no directory is an image reference
        ("alpine:3.20"; `pull=` says when it is fetched), and an `Image` is one: its layers
        are the root, its config applies (`entrypoint=` replaces its Entrypoint).

        `stdout`/`stderr` default to capture (in the Result); pass a file or fd to send the
        stream there instead (the CLI passes its own). `stdin` defaults to /dev/null, or to a
        pipe fed with `input`.

        The keywords (declared in `keywords.KEYWORDS`; the marker's names work too:
        `memory=` is `memory_limit=`): `memory_limit` ('64M' or bytes), `cpus` (CPUs, 0.5 =
        half of one; or the older `cpu_limit`, percent of one CPU), `pids_limit`, `timeout`
        (seconds), `env`, `cwd`, `hostname`, `network`, `mounts`, `output_limit`,
        `layer_size`. `layer`: an existing host directory that keeps the container's writes
        (in its `upper` subdirectory), so that the next container given it sees them; by
        default writes go to a tmpfs that vanishes with the container.

        Confinement (strict by default, each keyword loosens one thing): `user=False` makes
        container root host root (default: an unprivileged host uid); `seccomp=False` drops
        the syscall filter, `allow_syscalls` lets named calls through it; `capabilities` keeps
        more than the default few (e.g. ["SYS_PTRACE"]); `rlimits` overrides resource limits
        ({"nofile": 8192, "core": "unlimited", "stack": (soft, hard)}).
        """
        return self.launch(make_spec(image, command, **keywords), input=input, stdin=stdin,
                           stdout=stdout, stderr=stderr)

    def launch(self, spec: ContainerSpec, *, input: bytes | None = None, stdin: Any = None,
               stdout: Any = None, stderr: Any = None) -> Container:
        """Start a container of a spec checked beforehand (by `make_spec`, or by `spec_from`
        from values the plugin or the CLI checked at their own edge)."""
        return self._launch(spec, _check_input(input, stdin), stdin, stdout, stderr)

    def start(self) -> None:
        """Start this runtime's launcher now rather than at the first container, and return
        at once: it makes its zygote and spares while the caller does other things (a cold
        first container otherwise waits ~90 ms for them)."""
        with self._lock:
            self._refuse_if_closed()
        self._client.start()

    def pod(self, ports: Any = ()) -> pods.Pod:
        """A pod: containers run with `pod=` it share its network namespace and `ports`
        (published now, as for run(): [5432], {5432: 15432}...)."""
        return pods.make_pod(self, self._new_id(), ports)

    def status(self, container_id: str) -> ContainerStatus:
        """Status of a running container, or of one of the last 1024 finished."""
        with self._lock:
            finished = self._finished.get(container_id)
        return finished if finished is not None else self._get(container_id).status

    def stop(self, container_id: str, grace: float = DEFAULT_STOP_GRACE) -> Result:
        return self._get(container_id).stop(grace)

    def list(self) -> list[Container]:
        """The containers still running (whose results were not collected yet)."""
        with self._lock:
            return [c for c in self._running.values() if c.exec_of is None]

    def sandbox(self, limits: Limits, timeout: float | None,
                services: tuple[tuple[str, int], ...] = ()) -> SandboxLease:
        """A cgroup with `limits` for a process the caller forks itself (a sandboxed test
        body, see `plugin.sandbox`), which the launcher kills at `timeout` and removes;
        `services`: the published addresses it may reach, through the launcher's relay.
        The one asked ahead (`sandbox_ahead`) if it was asked the same."""
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead.asked == (limits, timeout, services):
                # one it could not make (or lost) is asked again now, as if none was ahead:
                # what failed then may not fail now, and what fails again is raised below
                with contextlib.suppress(errors.MinictrError):
                    lease = ahead.lease()
                    if lease is not None:
                        return lease
            else:
                ahead.cancel()
        lease = SandboxOrder(self._client, self._new_id(), limits, timeout, services).lease()
        if lease is None:
            raise LauncherError("the minictr launcher died while answering; "
                                "the next call starts a new one")
        return lease

    def sandbox_ahead(self, limits: Limits, timeout: float | None) -> None:
        """Ask now for the sandbox the next `sandbox()` call will want, as a rule: the
        launcher makes it while the caller does other things (it is not watched, and its
        timeout does not run, before that call). One asked otherwise is removed then, or at
        `close()`."""
        order = SandboxOrder(self._client, self._new_id(), limits, timeout)
        with self._lock:
            ahead, self._ahead = self._ahead, order
        if ahead is not None:
            ahead.cancel()

    def close(self) -> None:
        """Kill every container still running and stop the launcher."""
        with self._lock:  # a weak dict's iteration fails if another thread's run() adds to it
            self._life = _RuntimeLife.CLOSED
            running = list(self._running.values())
        for container in running:
            try:
                container.kill()
            except errors.MinictrError:
                pass
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.forget()  # the launcher, ending, removes it
        self._client.close()
        _open_runtimes.discard(self)

    def _launch(self, spec: ContainerSpec, input_data: bytes | None, stdin: Any, stdout: Any,
                stderr: Any, exec_of: str | None = None) -> Container:
        """Start a container; or, `exec_of` a container's id, another command in it."""
        container_id = self._new_id()
        op, target = (protocol.RUN, {}) if exec_of is None \
            else (protocol.EXEC, {"container": exec_of})
        with Pipes(input_data, stdin, stdout, stderr) as pipes:
            reply = self._client.call(op, fds=pipes.child_fds(), id=container_id,
                                      spec=spec.to_dict(), **target)
            monitor = Monitor(*pipes.take_parent_fds(input_data), spec.output_limit)
        container = Container(self, container_id, reply["pid"], spec, monitor, exec_of,
                              pods.published_of(reply.get("ports", ())))
        if spec.kill_on_output_limit:
            # weakly: the monitor is the container's, and must not keep it alive in a cycle
            monitor.on_overflow = functools.partial(_kill_flooding, weakref.ref(container))
        with self._lock:
            self._running[container_id] = container
        return container

    def _new_id(self) -> str:
        """48 random bits, and never one this runtime gave before (a Container handle, or a
        status lookup, must not find another container under an old id). Every container,
        exec, pod and sandbox takes one: a closed runtime refuses them here, since its client
        would start a launcher that nothing closes."""
        with self._lock:
            self._refuse_if_closed()
            while (container_id := secrets.token_hex(6)) in self._issued:
                pass
            self._issued.add(container_id)
        return container_id

    def _refuse_if_closed(self) -> None:
        """(Under the lock.)"""
        if self._life is _RuntimeLife.CLOSED:
            raise RuntimeClosedError("this ContainerRuntime is closed: make a new one (or "
                                     "use it as a context manager around all its runs)")

    def _get(self, container_id: str) -> Container:
        with self._lock:
            container = self._running.get(container_id)
        if container is None:
            state = "has finished" if container_id in self._finished else "is unknown"
            raise ContainerNotFoundError(f"container {container_id!r} {state} in this runtime")
        return container

    def _forget(self, container: Container) -> None:
        with self._lock:
            self._running.pop(container.id, None)
            self._finished[container.id] = container.status_now
            while len(self._finished) > _FINISHED_KEPT:
                self._finished.popitem(last=False)


def _kill_flooding(container: weakref.ref[Container]) -> None:
    """A stream passed output_limit with kill_on_output_limit: end it now, not at its timeout
    (a grader's flood would otherwise cost it the whole timeout)."""
    alive = container()
    if alive is not None:
        alive._request_end(grace=0)


def _out_of_cpu_time(spec: ContainerSpec, event: Mapping[str, Any]) -> bool:
    """The launcher killed it at its cpu_time_limit, or the kernel at its RLIMIT_CPU: SIGXCPU
    at the soft limit, SIGKILL at the hard one (told from another SIGKILL by the CPU time:
    the whole tree's, so at least the one process's that hit the limit)."""
    if event["ended_by"] is not None:
        return bool(event["ended_by"] == "cpu_time")
    hard = next((hard for name, _, hard in spec.security.rlimits if name == "cpu"), None)
    if hard is None or hard == confinement.UNLIMITED:
        return False
    cpu_time = event.get("cpu_time")
    return event["returncode"] == -signal.SIGXCPU or (
        event["returncode"] == -signal.SIGKILL and cpu_time is not None
        and cpu_time >= hard * _RLIMIT_CPU_SHARE)


def _check_signal(signum: Any) -> int:
    if isinstance(signum, bool) or not isinstance(signum, int) or \
            signum not in set(FORWARDED_SIGNALS) | {signal.SIGKILL}:
        raise ConfigError(f"signal {signum!r}: expected a signal the container's init can pass "
                          "on (not SIGSTOP, SIGCHLD or a fault signal)")
    return int(signum)


def _check_input(input_data: Any, stdin: Any) -> bytes | None:
    if input_data is None:
        return None
    if not isinstance(input_data, (bytes, bytearray, memoryview)):
        raise ConfigError(f"input={input_data!r:.40}: expected bytes (use .encode() for str)")
    if stdin is not None:
        raise ConfigError("input= and stdin= cannot be used together")
    return bytes(input_data)


_open_runtimes: weakref.WeakSet[ContainerRuntime] = weakref.WeakSet()


@atexit.register
def _close_open_runtimes() -> None:
    for runtime in list(_open_runtimes):
        runtime.close()

