"""The port forwarder's life: it holds a network namespace's published ports (listening
sockets made by the launcher in the host's network namespace) and relays each connection to
the same port on the namespace's loopback.

Why a process of its own, and why it works this way:
- A socket's network namespace is fixed when it is made (socket(2)). The forwarder is forked
  with the listening sockets, then enters the container's network namespace: from then on
  every socket it makes (the inner side of a connection) is in there, while the listeners it
  holds stay on the host.
- setns(CLONE_NEWNET) takes CAP_SYS_ADMIN over the namespace's owning user namespace and in
  our own. Without root the launcher has neither over a container's network namespace: its
  user namespace owns it. So the forwarder enters that user namespace first, which only a
  single-threaded process may do, and which cannot be undone: it could not be the launcher.
- It dies with the launcher (PR_SET_PDEATHSIG), and the launcher kills it when the last
  container of its namespace ends: no listener, no process and no namespace is left behind.

The launcher also asks it, on its control socket, whether a port accepts connections inside
(`wait_for_port`): two bytes of port number in, one line of errno out (0: accepted).

The same relay, the other way round, gives sandboxed test bodies the services their fixtures
started: see `forwarder.services`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from pytest_minictr.container.init import die_with_parent
from pytest_minictr.host import linux

Address = tuple[str, int]  # (host address, port), as getsockname() gives it

CHUNK = 1 << 20          # bytes moved per splice: a bulk transfer costs few system calls
READ, WRITE = select.EPOLLIN, select.EPOLLOUT
SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PROBE_TIMEOUT = 1.0      # a connect on a loopback answers at once, unless its backlog is full
PROBE = struct.Struct("!H")
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close(2) sends a reset


@dataclass(frozen=True)
class Route:
    """Where a listener's connections go, and who hears (target, errno) when it refuses."""

    target: Address
    refused: Callable[[Address, int], None] | None = None


def run_forwarder(control: int, listeners: dict[int, int], namespaces: tuple[int, ...],
                  parent_pidfd: int) -> NoReturn:
    """The forwarder's whole life, in a child the launcher forked: `listeners` {fd: port
    inside}, `namespaces` the fds of the (user and) network namespace to enter, in order."""
    code = 1
    try:
        die_with_parent(parent_pidfd, (control, *listeners, *namespaces))
        # Not dumpable: without root we enter the container's user namespace, where its root
        # could otherwise open our /proc files (fds: the host's listening sockets).
        linux.set_dumpable(False)
        for fd, nstype in zip(namespaces, _nstypes(len(namespaces)), strict=False):
            linux.setns(fd, nstype)
            os.close(fd)
        routes = {socket.socket(fileno=fd): Route(("127.0.0.1", port))
                  for fd, port in listeners.items()}
        Relay(socket.socket(fileno=control), routes).serve()
        code = 0
    finally:
        os._exit(code)


def _nstypes(count: int) -> tuple[int, ...]:
    return (linux.CLONE_NEWUSER, linux.CLONE_NEWNET)[-count:]


class Relay:
    """Accepts on the listeners, connects each connection to its listener's target, moves
    bytes both ways until both ends have closed; answers the launcher on its control socket
    (`on_control`: its probes). One thread, one epoll, a handler per fd (raw epoll, not
    `selectors`: a round trip through us is four of its events, and each microsecond of ours
    is one of the client's)."""

    def __init__(self, control: socket.socket, listeners: dict[socket.socket, Route]):
        self.epoll = select.epoll()
        self.handlers: dict[int, Any] = {}
        self.control: socket.socket | None = control  # None once the launcher has gone
        self.register(control, READ, self.on_control)
        for listener, route in listeners.items():
            self.listen(listener, route)

    def listen(self, listener: socket.socket, route: Route) -> None:
        """Relay each connection `listener` accepts by `route`."""
        listener.setblocking(False)
        self.register(listener, READ, lambda _mask: self._accept(listener, route))

    def register(self, sock: socket.socket, mask: int, handler: Callable[..., None]) -> None:
        self.epoll.register(sock.fileno(), mask)
        self.handlers[sock.fileno()] = handler

    def modify(self, sock: socket.socket, mask: int) -> None:
        self.epoll.modify(sock.fileno(), mask)

    def unregister(self, sock: socket.socket) -> None:
        self.epoll.unregister(sock.fileno())
        del self.handlers[sock.fileno()]

    def serve(self) -> None:
        handlers = self.handlers
        while self.control is not None:
            for fd, mask in self.epoll.poll():
                handler = handlers.get(fd)
                if handler is not None:  # (an fd closed by an earlier event of this round)
                    handler(mask)

    def on_control(self, _mask: int) -> None:
        """The launcher's probe: is a port accepting inside?"""
        control = self.control
        assert control is not None  # the serve loop runs only while there is one
        request = control.recv(PROBE.size)
        if len(request) < PROBE.size:
            self.control = None  # the launcher ended us, or is gone
            return
        control.sendall(b"%d\n" % probe(PROBE.unpack(request)[0]))

    def _accept(self, listener: socket.socket, route: Route) -> None:
        try:
            accepted, _ = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        onward = socket.socket(_family(route.target[0]), socket.SOCK_STREAM)
        for sock in (accepted, onward):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        failure = onward.connect_ex(route.target)
        if failure not in (0, errno.EINPROGRESS):
            _give_up(accepted, onward, route, failure)
            return
        self.register(onward, WRITE, lambda _mask: self._connected(accepted, onward, route))

    def _connected(self, accepted: socket.socket, onward: socket.socket, route: Route) -> None:
        self.unregister(onward)
        failure = onward.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failure:
            _give_up(accepted, onward, route, failure)
            return
        Connection(self, accepted, onward)


def _give_up(accepted: socket.socket, onward: socket.socket, route: Route,
             failure: int) -> None:
    """Nothing listens at the target (or it is unreachable): told first, so that the telling
    is there before the client can act on it; then the client's connection is reset, as near
    a refusal as an accepted connection comes (an orderly end reads as an empty answer)."""
    if route.refused is not None:
        route.refused(route.target, failure)
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    accepted.close()
    onward.close()


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class Connection:
    """One relayed connection: two sockets, a direction each way, each through a pipe of
    its own with splice(2), so that bytes go from socket to socket without a copy through
    us (a bulk transfer costs no more than its system calls). Bytes the target could not
    take yet wait in the pipe (`buffered`), and we stop reading their source meanwhile."""

    def __init__(self, relay: Relay, a: socket.socket, b: socket.socket):
        self.relay = relay
        self.peer = {a: b, b: a}
        self.pipe = {a: _pipe(), b: _pipe()}      # the pipe of the bytes going to a socket
        self.buffered = {a: 0, b: 0}              # bytes in that pipe
        self.open_reading = {a, b}                # sockets whose end we have not seen
        self.registered: dict[socket.socket, int] = {}
        for sock in (a, b):
            self._interest(sock)

    def _handler(self, sock: socket.socket) -> Callable[[int], None]:
        return lambda mask: self._on_event(sock, mask)

    def _on_event(self, sock: socket.socket, mask: int) -> None:
        try:
            if mask & WRITE:
                self._flush(sock)
            if mask & ~WRITE:  # readable, or an error or hang-up that a read will tell
                if self._move(sock):
                    return  # the usual case: all passed on, nothing else changes
        except OSError:  # a reset on either side ends the connection both ways
            self._close()
            return
        if not self.open_reading and not any(self.buffered.values()):
            self._close()
            return
        for each in self.peer:
            self._interest(each)

    def _move(self, source: socket.socket) -> bool:
        """Pass on what `source` has; True if all of it went at once."""
        target = self.peer[source]
        try:
            moved = os.splice(source.fileno(), self.pipe[target][1], CHUNK, flags=SPLICE)
        except BlockingIOError:
            return True  # woken for nothing
        if not moved:
            self.open_reading.discard(source)
            if not self.buffered[target]:
                target.shutdown(socket.SHUT_WR)
            return False
        self.buffered[target] += moved
        self._flush(target)
        return not self.buffered[target]

    def _flush(self, target: socket.socket) -> None:
        try:
            self.buffered[target] -= os.splice(self.pipe[target][0], target.fileno(),
                                               self.buffered[target], flags=SPLICE)
        except BlockingIOError:
            pass
        if not self.buffered[target] and self.peer[target] not in self.open_reading:
            target.shutdown(socket.SHUT_WR)  # its source ended: pass the end on

    def _interest(self, sock: socket.socket) -> None:
        wanted = (READ if sock in self.open_reading and not self.buffered[self.peer[sock]]
                  else 0) | (WRITE if self.buffered[sock] else 0)
        had = self.registered.get(sock, 0)
        if wanted == had:
            return
        if not wanted:
            self.relay.unregister(sock)
        elif not had:
            self.relay.register(sock, wanted, self._handler(sock))
        else:
            self.relay.modify(sock, wanted)
        self.registered[sock] = wanted

    def _close(self) -> None:
        for sock in self.peer:
            if self.registered.pop(sock, 0):
                self.relay.unregister(sock)
            sock.close()
            for fd in self.pipe[sock]:
                os.close(fd)


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:  # a pipe holds 64 KiB; 1 MiB (any user's most) lets a bulk transfer move in big steps
        fcntl.fcntl(write_end, F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass
    return read_end, write_end


def probe(port: int) -> int:
    """Whether `port` accepts a connection on this network namespace's loopback: 0, or the
    errno of the refusal."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            return sock.connect_ex(("127.0.0.1", port))
        except OSError as error:  # a timeout (socket.timeout) among them
            return error.errno or errno.ETIMEDOUT
