"""Pods, in the launcher: network namespaces that outlive one container's view of them.
A pod is several containers in one network namespace (`runtime.pod()`), or one container's
own namespace when it publishes ports or is probed: a pod of one.

A `Pod` is made before its first container starts, so that its ports are bound
(and a clash reported) before anything runs: a container's own when it publishes ports or is
probed (`wait_for_port`), a pod's when the caller makes the pod. Its first container's
network namespace becomes the pod's; the forwarder (see `forwarder.relay`) is forked into
it then. When its last container ends, the forwarder is killed and the listeners and the
namespace fds closed: the kernel frees the namespace with its last process.

The service relay is the same forwarder the other way round, for the sandboxed test bodies:
one per launcher, forked at first need; the listeners are the bodies', made in their network
namespaces, and it connects to the services' published addresses on the host (see
`forwarder.services`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from pytest_minictr.errors import ConfigError, ContainerNotFoundError
from pytest_minictr.forwarder.relay import PROBE, run_forwarder
from pytest_minictr.forwarder.services import run_service_relay
from pytest_minictr.host.proc import open_namespaces
from pytest_minictr.ports import Port
from pytest_minictr.spec import ContainerSpec

LISTEN_BACKLOG = 128
PROBE_ANSWER_TIMEOUT = 5.0  # the forwarder's own connect gives up after PROBE_TIMEOUT


@dataclass
class Forwarder:
    pid: int
    pidfd: int
    control: socket.socket

    def probe(self, port: int) -> int:
        self.control.settimeout(PROBE_ANSWER_TIMEOUT)
        self.control.sendall(PROBE.pack(port))
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = self.control.recv(16)
            if not chunk:
                raise ContainerNotFoundError("the container's network has ended")
            answer += chunk
        return int(answer)

    def end(self) -> None:
        self.control.close()
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.pidfd)


@dataclass
class Pod:
    """One network namespace's ports, forwarder and members (container ids)."""

    key: str                                   # the container's id, or the pod's
    listeners: dict[socket.socket, Port]
    members: set[str] = field(default_factory=set)
    namespaces: tuple[int, ...] = ()           # (user namespace,) network namespace fds
    forwarder: Forwarder | None = None
    joined: bool = False                       # a container has entered it
    made_by_caller: bool = False               # by runtime.pod(), not for one container

    def published(self) -> list[list]:
        """[container port, host address, host port] of each listener, as bound."""
        return [[port.container_port, *sock.getsockname()[:2]]
                for sock, port in self.listeners.items()]

    def join(self, container_id: str, child_pid: int, rootless: bool) -> None:
        """A container started in it; the first one's namespaces become the pod's."""
        self.members.add(container_id)
        if not self.joined:
            self.joined = True
            try:
                self.namespaces = _open_namespaces(child_pid, rootless)
            except ContainerNotFoundError:
                return  # it ended already (`true`): nothing to forward to, ever

    def start_forwarder(self, parent_pidfd: int) -> None:
        """Fork the forwarder, if it has ports to serve and none yet. The launcher does it
        once it has answered the run (a fork is slow, the more so under load):
        the caller goes on meanwhile, and a connection made before waits in the backlog."""
        if self.listeners and self.forwarder is None and not self.gone and self.joined:
            self.forwarder = _fork_forwarder_of(self, parent_pidfd)

    @property
    def gone(self) -> bool:
        """Its first container ended before we could hold its namespace."""
        return self.joined and not self.namespaces

    def probe(self, port: int, parent_pidfd: int) -> int:
        if self.gone:
            return errno.ECONNREFUSED  # (a forwarder without a namespace would be the host's)
        if self.forwarder is None:
            self.forwarder = _fork_forwarder_of(self, parent_pidfd)
        return self.forwarder.probe(port)

    def leave(self, container_id: str) -> bool:
        """A container ended; True if it was the last (the pod has ended then)."""
        self.members.discard(container_id)
        if self.members or not self.joined:
            return False
        self.end()
        return True

    def end(self) -> None:
        if self.forwarder is not None:
            self.forwarder.end()
            self.forwarder = None
        for sock in self.listeners:
            sock.close()
        for fd in self.namespaces:
            os.close(fd)
        self.listeners, self.namespaces = {}, ()


class Pods:
    """The launcher's pods: by pod id or container id, and which one each running
    container is in."""

    def __init__(self, rootless: bool, own_pidfd: int):
        self.rootless = rootless
        self.own_pidfd = own_pidfd
        self.by_key: dict[str, Pod] = {}
        self.of: dict[str, Pod] = {}          # by id of a running container
        self.forwarders_due: list[Pod] = []   # forked once the run is answered
        self.service_relay: Forwarder | None = None  # the sandboxed bodies' (see above)

    def for_run(self, container_id: str, spec: ContainerSpec) -> Pod | None:
        """The pod it joins, or one of the container's own for its published ports; bound
        before the container starts."""
        if spec.pod is not None:
            pod = self.by_key.get(spec.pod)
            if pod is None or pod.gone:
                raise ConfigError(f"pod {spec.pod!r} has ended (with its last container) or "
                                  "is not this runtime's: make a new one with runtime.pod()")
            return pod
        if not spec.ports:
            return None
        pod = self.by_key[container_id] = bind_ports(container_id, spec.ports)
        return pod

    def started(self, pod: Pod, container_id: str, child_pid: int) -> list:
        """A container of `pod` runs: it joins; its ports, as the run's reply names them."""
        pod.join(container_id, child_pid, self.rootless)
        self.of[container_id] = pod
        self.forwarders_due.append(pod)
        return pod.published()

    def not_started(self, pod: Pod | None) -> None:
        """A container's own pod (of one) whose container did not start goes with it."""
        if pod is not None and not pod.joined and not pod.made_by_caller:
            self._end(pod)

    def make_pod(self, pod_id: str, ports: tuple[Port, ...]) -> list:
        pod = self.by_key[pod_id] = bind_ports(pod_id, ports, made_by_caller=True)
        return pod.published()

    def end_pod(self, pod_id: str) -> None:
        pod = self.by_key.get(pod_id)
        if pod is not None and not pod.members:
            self._end(pod)

    def probe(self, container_id: str, child_pid: int, port: int) -> int:
        pod = self.of.get(container_id)
        if pod is None:  # a container without published ports, probed: a pod of its own
            pod = self.by_key[container_id] = Pod(container_id, {})
            pod.join(container_id, child_pid, self.rootless)
            self.of[container_id] = pod
        return pod.probe(port, self.own_pidfd)

    def leave(self, container_id: str) -> None:
        """A container ended (before the caller hears of it: by then its ports are closed,
        if it was the last container of their pod)."""
        pod = self.of.pop(container_id, None)
        if pod is not None and pod.leave(container_id):
            del self.by_key[pod.key]

    def relay_for_body(self, intake: int, reachable: list) -> None:
        """Hand the service relay a sandboxed body's socket (`intake`, which we close) and
        the addresses it may reach ([address, port] each). A relay that cannot be had (no
        process to spare: EAGAIN) is told on `intake`: the worker names it in the report."""
        order = json.dumps(reachable).encode()
        try:
            for attempt in range(2):  # the relay was killed since: another one
                if self.service_relay is None:
                    self.service_relay = _fork(lambda control: run_service_relay(
                        control, self.own_pidfd), socket.SOCK_SEQPACKET)
                try:
                    socket.send_fds(self.service_relay.control, [order], [intake])
                    return
                except OSError:
                    self.service_relay.end()
                    self.service_relay = None
                    if attempt:
                        raise
        except OSError as error:
            line = {"relay": f"the launcher has no relay to the services: {error.strerror}"}
            with contextlib.suppress(OSError):
                os.write(intake, json.dumps(line).encode() + b"\n")
        finally:
            os.close(intake)

    def start_due_forwarders(self) -> None:
        while self.forwarders_due:
            pod = self.forwarders_due.pop()
            try:
                pod.start_forwarder(self.own_pidfd)
            except OSError as error:  # (EAGAIN: no process to spare) its ports stay unserved
                print(f"minictr launcher: no forwarder for {pod.key}: {error}",
                      file=sys.stderr)

    def end_all(self) -> None:
        for pod in list(self.by_key.values()):
            self._end(pod)
        if self.service_relay is not None:
            self.service_relay.end()
            self.service_relay = None

    def _end(self, pod: Pod) -> None:
        pod.end()
        del self.by_key[pod.key]


def bind_ports(key: str, ports: tuple[Port, ...], made_by_caller: bool = False) -> Pod:
    """Listening sockets for `ports`, in the launcher's (the host's) network namespace; a
    port taken or an address not ours is the caller's ConfigError, before anything starts."""
    listeners: dict[socket.socket, Port] = {}
    try:
        for port in ports:
            listeners[_listen(port)] = port
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return Pod(key, listeners, made_by_caller=made_by_caller)


def _listen(port: Port) -> socket.socket:
    family = socket.AF_INET6 if ":" in port.host_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a port left in TIME_WAIT by the last run of the same test is free to take again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((port.host_address, port.host_port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise ConfigError(f"ports: cannot publish container port {port.container_port} on "
                          f"{port.host_address}:{port.host_port}: {error.strerror} (leave "
                          "the host port out to get a free one)") from None
    return sock


def _open_namespaces(child_pid: int, rootless: bool) -> tuple[int, ...]:
    """Our child's (the init's, or the keeper's: the same namespaces) network namespace, and
    without root its user namespace, which owns it and must be entered first."""
    try:
        opened = open_namespaces(child_pid, ("user", "net") if rootless else ("net",))
    except OSError:
        raise ContainerNotFoundError("the container is not running (it has just ended)") \
            from None
    return tuple(opened.values())


def _fork_forwarder_of(pod: Pod, parent_pidfd: int) -> Forwarder:
    return _fork(lambda control: run_forwarder(
        control, {sock.fileno(): port.container_port for sock, port in pod.listeners.items()},
        pod.namespaces, parent_pidfd))


def _fork(life: Callable[[int], NoReturn], kind: int = socket.SOCK_STREAM) -> Forwarder:
    """Fork a forwarder that lives `life` (given its end of the control socket)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    try:
        pid = os.fork()
        if pid == 0:
            life(theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Forwarder(pid, os.pidfd_open(pid), ours)
