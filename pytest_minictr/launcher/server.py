"""The launcher process: a small, single-threaded server that forks containers for one caller.

Why a separate process: the caller is usually pytest, large (fork cost grows with its memory)
and often threaded (a forked child of a threaded process can deadlock on a lock some other
thread held). This process stays small and has one thread; it is started once per runtime
(by `client.LauncherClient`, as `python -S` calling `server.main([FD])`) and reused.

It speaks `protocol` over one socket: the requests of `protocol.REQUESTS` (their fields, fds
and replies are declared there), each answered in order by the `_op_` method of its name.
When a container ends, one JSON line goes to its `events` pipe (returncode, how it ended, wall
and CPU time) and the pipe is closed. When the caller goes away (end of the socket), every
container is killed and the launcher exits: nothing outlives the caller. The caller's own end
counts as that too: a process it forked (multiprocessing's fork does) holds its copy of the
socket, and must not keep the containers alive after the caller is gone.
"""

from __future__ import annotations

import functools
import gc
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable

from pytest_minictr import layer_holds as holds
from pytest_minictr import protocol
from pytest_minictr.errors import ContainerNotFoundError, LauncherError, MinictrError
from pytest_minictr.host import linux
from pytest_minictr.launcher.cpu_watch import CpuWatch
from pytest_minictr.launcher.ends import Ends, kill, kill_all
from pytest_minictr.launcher.life import Container, Happening
from pytest_minictr.launcher.pods import Pods
from pytest_minictr.launcher.sandboxes import Sandbox
from pytest_minictr.launcher.starter import ChildFds, ExecTarget, Started, Starter
from pytest_minictr.ports import from_dicts
from pytest_minictr.protocol import EndReport, SetupReport
from pytest_minictr.spec import ContainerSpec, Limits

SETUP_TIMEOUT = 60.0  # seconds a container may take from fork to exec before we give up


class Launcher:
    def __init__(self, control: socket.socket, caller: int | None = None):
        self.control = control
        self.caller = caller  # a pidfd of the process that started us (see caller_pidfd)
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ)
        if caller is not None:
            self.selector.register(caller, selectors.EVENT_READ)
        self.containers: dict[str, Container] = {}
        self.sandboxes: dict[str, Sandbox] = {}  # sandboxed test bodies (see `sandboxes`)
        self.starter = Starter()
        self.pods = Pods(self.starter.rootless, self.starter.own_pidfd)
        self.ends = Ends(self.selector, self.containers, self.pods)
        # the dispatch, by the one table of requests (a request without its method fails here)
        self.handlers = {op: getattr(self, f"_op_{op}") for op in protocol.REQUESTS}

    def serve(self) -> None:
        while True:
            # A spare is made while nothing else waits for us and no container is between its
            # start and its end, so that it never competes with one for a CPU.
            needs_spare = self.starter.spares.wanted() and all(
                c.ended for c in self.containers.values())
            events = self.selector.select(0 if needs_spare else self._seconds_to_next_deadline())
            if not events and needs_spare:
                self.starter.spares.prepare()  # only when nothing else waits for us
            for key, _ in events:
                if key.fileobj is self.control or key.fileobj == self.caller:
                    if key.fileobj == self.caller or not self._handle_request():
                        self.shutdown()
                        return
                else:
                    handler, container = key.data
                    self._guarded(handler, container)
            self.pods.start_due_forwarders()
            self._fire_deadlines(time.monotonic())

    def _guarded(self, handler: Callable[[Container], None], container: Container) -> None:
        """A container's end is handled apart from all others': nothing it writes to us, nor
        any failure in handling it, may stop the loop that serves the other containers."""
        try:
            handler(container)
        except Exception as error:  # noqa: BLE001
            print(f"minictr launcher: container {container.id}: {error!r}", file=sys.stderr)
            if container.id in self.containers and not container.ended:
                container.report = EndReport()  # unusable: report what we know ourselves
                kill_all(container)

    # -- requests ------------------------------------------------------------------------------

    def _handle_request(self) -> bool:
        """Answer one request; False at the end of the caller's socket (or if it broke)."""
        try:
            received = protocol.recv_message(self.control)
        except (OSError, EOFError, ValueError):
            return False
        if received is None:
            return False
        message, fds = received
        handler = self.handlers.get(message.get("op"))
        try:
            if handler is None:
                raise ValueError(f"unknown request {message.get('op')!r}")
            reply = handler(message, fds)
        except MinictrError as error:
            reply = _error_reply(error)
        except Exception as error:  # noqa: BLE001 - the caller must get an answer, not a hang
            reply = _error_reply(LauncherError(f"{type(error).__name__}: {error}"))
        try:
            protocol.send_message(self.control, {**reply, "seq": message.get("seq")})
        except OSError:
            return False  # the caller went away while we worked on its request
        return True

    def _op_run(self, message: dict, fds: list[int]) -> dict:
        spec = ContainerSpec.from_dict(message["spec"])
        container_id = message["id"]
        try:
            pod = self.pods.for_run(container_id, spec)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        joins = pod.namespaces if pod is not None and pod.joined else None
        try:
            # before the setup mounts them, until our child is reaped (see `layer_holds`)
            held = holds.hold_layers(spec.layers)
        except BaseException:
            self.pods.not_started(pod)
            for fd in fds:
                os.close(fd)
            raise
        try:
            reply = self._start(container_id, spec, fds,
                                lambda child_fds: self.starter.start(spec, child_fds, joins),
                                held=held)
        except BaseException:
            self.pods.not_started(pod)
            raise
        if not reply["ok"] or pod is None:
            self.pods.not_started(pod)
            return reply
        ports = self.pods.started(pod, container_id, self.containers[container_id].pid)
        return {**reply, "ports": ports}

    def _op_pod(self, message: dict, _fds: list[int]) -> dict:
        return {"ok": True, "ports": self.pods.make_pod(message["pod"],
                                                           from_dicts(message["ports"]))}

    def _op_end_pod(self, message: dict, _fds: list[int]) -> dict:
        self.pods.end_pod(message["pod"])
        return {"ok": True}

    def _op_probe(self, message: dict, _fds: list[int]) -> dict:
        container = self._find_running(message["id"])
        if container is None:
            raise ContainerNotFoundError(f"container {message['id']!r} is not running")
        return {"ok": True, "errno": self.pods.probe(container.id, container.pid,
                                                         int(message["port"]))}

    def _op_exec(self, message: dict, fds: list[int]) -> dict:
        target = self._find_running(message["container"])
        if target is None:
            for fd in fds:
                os.close(fd)
            raise ContainerNotFoundError(f"container {message['container']!r} is not running")
        spec = ContainerSpec.from_dict(message["spec"])
        return self._start(message["id"], spec, fds, lambda child_fds: self.starter.start_exec(
            ExecTarget(target.pid, target.cgroup), spec, child_fds), exec_of=target.id)

    def _op_stats(self, message: dict, _fds: list[int]) -> dict:
        container = self._find_running(message["id"])
        if container is None:
            raise ContainerNotFoundError(f"container {message['id']!r} is not running")
        stats = container.cgroup.stats()
        helpers = sum(1 for c in self.containers.values() if c.exec_of == container.id)
        return {"ok": True, "stats": {
            "memory_current": stats.memory_current, "memory_peak": stats.memory_peak,
            # a bool for the caller: "not seen" where nothing could see it (no cgroups)
            "cpu_time": stats.cpu_time, "oom_killed": bool(stats.oom_killed),
            # the group holds our init and each exec's helper besides the command's processes
            "processes": None if stats.pids_current is None
            else max(0, stats.pids_current - 1 - helpers)}}

    def _start(self, container_id: str, spec: ContainerSpec, fds: list[int],
               start: Callable[[ChildFds], Started],
               exec_of: str | None = None, held: tuple[int, ...] = ()) -> dict:
        """Start a container (or an exec: `start` forks what runs it) on the caller's fds
        [stdin, stdout, stderr, events]; watch it until its end. `held`: the locks on its
        image's layers, let go when our child is reaped (or now, if it does not start)."""
        stdin, stdout, stderr, events = fds
        setup_r, setup_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        began = time.monotonic()
        try:
            started = start(ChildFds(stdin, stdout, stderr, setup_w, status_w))
        except BaseException:
            for fd in (setup_r, status_r, events, *held):
                os.close(fd)
            raise
        finally:
            for fd in (setup_w, status_w, stdin, stdout, stderr):
                os.close(fd)
        pid = started.pid
        cgroup = started.cgroup
        pidfd = os.pidfd_open(pid)
        setup = _read_setup(setup_r, started.keeper)
        init_pid = pid if setup.pid is None else setup.pid
        init_pidfd = pidfd if init_pid == pid else _pidfd_or_none(init_pid)
        if setup.error is not None:
            kill(init_pidfd)
            os.waitpid(pid, 0)
            linux.close_each((pidfd, init_pidfd, status_r, events, *held))
            cgroup.discard()
            return {"ok": False, "error": setup.error}
        container = Container(container_id, pid, pidfd, init_pidfd, status_r, events, began,
                              began + spec.timeout if spec.timeout else None, cgroup,
                              exec_of=exec_of,
                              command_group=init_pid if exec_of is not None else None,
                              stop_signal=spec.stop_signal, held=held)
        if spec.cpu_time_limit is not None and exec_of is None:
            container.cpu_watch = CpuWatch.start(cgroup, spec.cpu_time_limit, spec.limits.cpus,
                                                 time.monotonic())
        self.containers[container.id] = container
        self.selector.register(pidfd, selectors.EVENT_READ, (self.ends.on_exit, container))
        self.selector.register(status_r, selectors.EVENT_READ, (self.ends.on_status, container))
        return {"ok": True, "pid": init_pid}

    def _op_signal(self, message: dict, _fds: list[int]) -> dict:
        container = self._find(message["id"])
        if container is not None:
            kill(container.init_pidfd, message["signum"])
        return {"ok": True, "running": container is not None}

    def _op_stop(self, message: dict, _fds: list[int]) -> dict:
        container = self._find(message["id"])
        if container is not None and not container.ended:
            grace = float(message["grace"])  # checked by the caller: 0 <= grace <= MAX_SECONDS
            if grace > 0:
                container.advance(Happening.STOP_ASKED)
                kill(container.init_pidfd, container.stop_signal)
                kill_at = time.monotonic() + grace
                container.kill_at = min(container.kill_at or kill_at, kill_at)
            else:
                container.advance(Happening.KILL_ASKED)
                kill_all(container)
        return {"ok": True, "running": container is not None}

    def _op_sandbox(self, message: dict, fds: list[int]) -> dict:
        limits = Limits(**message["limits"])
        try:
            if self.starter.rootless:
                cgroup, init_pid = self.starter.sandbox_cgroup(limits), None
                release = cgroup.discard
            else:
                spare = self.starter.spare_for_body(limits)
                cgroup, init_pid = spare.cgroup, spare.pid
                release = functools.partial(self.starter.spares.discard, spare)
        except BaseException:
            linux.close_each(fds)
            raise
        if message["services"]:
            self.pods.relay_for_body(fds[1], message["services"])
        self.sandboxes[message["id"]] = Sandbox(message["id"], cgroup, fds[0],
                                                message["timeout"], release, init_pid)
        return {"ok": True, "init_pid": init_pid,
                "cgroup_procs": [os.path.join(path, "cgroup.procs") for path in cgroup.paths]}

    def _op_watch(self, message: dict, _fds: list[int]) -> dict:
        sandbox = self.sandboxes[message["id"]]
        if sandbox.watch(message["pid"]):
            assert sandbox.pidfd is not None  # (watched: its pidfd is open)
            self.selector.register(sandbox.pidfd, selectors.EVENT_READ,
                                   (self._on_sandbox_exit, sandbox))
        else:
            self._on_sandbox_exit(sandbox)
        return {"ok": True}

    def _on_sandbox_exit(self, sandbox: Sandbox) -> None:
        if sandbox.pidfd is not None:
            self.selector.unregister(sandbox.pidfd)
        del self.sandboxes[sandbox.id]
        sandbox.end()

    def _find(self, container_id: str) -> Container | None:
        return self.containers.get(container_id)

    def _find_running(self, container_id: str) -> Container | None:
        """A container (not an exec) whose end has not come."""
        container = self._find(container_id)
        if container is None or container.exec_of is not None or container.ended:
            return None
        return container

    # -- time limits ---------------------------------------------------------------------------

    def _seconds_to_next_deadline(self) -> float | None:
        watched: list[Container | Sandbox] = [*self.containers.values(),
                                              *self.sandboxes.values()]
        deadlines = [t for c in watched for t in (c.timeout_at, c.kill_at) if t is not None]
        deadlines += [c.cpu_watch.check_at for c in self.containers.values()
                      if c.cpu_watch is not None and c.cpu_watch.check_at is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _fire_deadlines(self, now: float) -> None:
        for sandbox in self.sandboxes.values():
            if sandbox.timeout_at is not None and now >= sandbox.timeout_at:
                sandbox.time_up()
        for container in self.containers.values():
            if container.timeout_at is not None and now >= container.timeout_at \
                    and not container.ended:
                container.timeout_at = None
                container.advance(Happening.TIME_UP)
                kill_all(container)
            watch = container.cpu_watch
            if watch is not None and watch.check_at is not None and now >= watch.check_at:
                if container.ended:  # told, not reaped yet: a due look would spin our loop
                    watch.check_at = None
                elif watch.exceeded(now):
                    container.advance(Happening.CPU_TIME_UP)
                    kill_all(container)
            if container.kill_at is not None and now >= container.kill_at:
                container.kill_at = None
                kill_all(container)  # (still STOPPING: the SIGTERM is what asked it to end)

    def shutdown(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            self._on_sandbox_exit(sandbox)
        for container in list(self.containers.values()):
            kill_all(container)
        for container in list(self.containers.values()):
            self.ends.on_exit(container)
        self.pods.end_all()
        self.starter.shut_down()


def _error_reply(error: MinictrError) -> dict:
    return {"ok": False, "error": protocol.error_fields(error)}


def _read_setup(setup_r: int, has_keeper: bool) -> SetupReport:
    """Read the setup pipe until every child closed it (`setup_r` is closed then): the init's
    pid (a keeper sends it; otherwise our child is the init), or what failed."""
    data = b""
    deadline = time.monotonic() + SETUP_TIMEOUT
    try:
        while True:
            if not select.select([setup_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return SetupReport(error=protocol.error_fields(LauncherError(
                    f"container setup took over {SETUP_TIMEOUT:g} s")))
            chunk = os.read(setup_r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(setup_r)
    setup = SetupReport.parse(data)
    if has_keeper and setup.pid is None and setup.error is None:
        return SetupReport(error=protocol.error_fields(LauncherError(
            "the container's keeper died during setup")))
    return setup


def _pidfd_or_none(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def caller_pidfd() -> int | None:
    """A pidfd of our parent, the caller that started us; None if it died as we looked. (One
    that died before we looked is not seen so: we watch whoever took us in, and the end of
    the socket alone tells us of the caller's.)"""
    parent = os.getppid()
    try:
        pidfd = os.pidfd_open(parent)
    except OSError:
        return None
    if os.getppid() != parent:  # it died between the two calls: the pidfd names another
        os.close(pidfd)
        return None
    return pidfd


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # The caller decides what an interrupt means; a Ctrl-C must not kill us before we clean up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(args[0]))
    server = Launcher(control, caller_pidfd())
    # Everything imported so far lives as long as we do: freezing it keeps the collector of a
    # forked child from touching (and so copying) those pages.
    gc.collect()
    gc.freeze()
    server.serve()


if __name__ == "__main__":
    main()
