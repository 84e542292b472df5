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
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
from typing import NoReturn

from pytest_minictr.container.init import die_with_parent
from pytest_minictr.host import linux

CHUNK = 1 << 18          # bytes moved per read: a bulk transfer costs few system calls
PROBE_TIMEOUT = 1.0      # a connect on a loopback answers at once, unless its backlog is full
PROBE = struct.Struct("!H")


def run_forwarder(control: int, listeners: dict[int, int], namespaces: tuple[int, ...],
                  parent_pidfd: int) -> NoReturn:
    """The forwarder's whole life, in a child the launcher forked: `listeners` {fd: port
    inside}, `namespaces` the fds of the (user and) network namespace to enter, in order."""
    code = 1
    try:
        die_with_parent(parent_pidfd, (control, *listeners, *namespaces))
        for fd, nstype in zip(namespaces, _nstypes(len(namespaces))):
            linux.setns(fd, nstype)
            os.close(fd)
        Relay(socket.socket(fileno=control), {socket.socket(fileno=fd): port
                                              for fd, port in listeners.items()}).serve()
        code = 0
    finally:
        os._exit(code)


def _nstypes(count: int) -> tuple[int, ...]:
    return (linux.CLONE_NEWUSER, linux.CLONE_NEWNET)[-count:]


class Relay:
    """Accepts on the listeners, connects inside, moves bytes both ways until both ends have
    closed; answers the launcher's probes. One thread, one epoll."""

    def __init__(self, control: socket.socket, listeners: dict[socket.socket, int]):
        self.selector = selectors.DefaultSelector()
        self.control = control
        self.selector.register(control, selectors.EVENT_READ, self._answer_probe)
        for listener, port in listeners.items():
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ,
                                   lambda sock, _mask, port=port: self._accept(sock, port))

    def serve(self) -> None:
        while self.control is not None:
            for key, mask in self.selector.select():
                key.data(key.fileobj, mask)

    def _answer_probe(self, control: socket.socket, _mask: int) -> None:
        request = control.recv(PROBE.size)
        if len(request) < PROBE.size:
            self.control = None  # the launcher ended us, or is gone
            return
        control.sendall(b"%d\n" % probe(PROBE.unpack(request)[0]))

    def _accept(self, listener: socket.socket, port: int) -> None:
        try:
            outside, _ = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        inside = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for sock in (outside, inside):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if inside.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            outside.close()  # nothing listens inside: the client sees the connection end
            inside.close()
            return
        self.selector.register(inside, selectors.EVENT_WRITE,
                               lambda sock, _mask: self._connected(outside, inside))

    def _connected(self, outside: socket.socket, inside: socket.socket) -> None:
        self.selector.unregister(inside)
        if inside.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            outside.close()
            inside.close()
            return
        Connection(self.selector, outside, inside)


class Connection:
    """One relayed connection: two sockets, a direction each way. Bytes a slow reader could
    not take yet wait in `pending` (and we stop reading their source meanwhile)."""

    def __init__(self, selector: selectors.BaseSelector, a: socket.socket, b: socket.socket):
        self.selector = selector
        self.peer = {a: b, b: a}
        self.pending: dict[socket.socket, bytes] = {a: b"", b: b""}  # bytes waiting for a sock
        self.open_reading = {a, b}       # sockets whose end of stream we have not seen
        self.registered: dict[socket.socket, int] = {}
        for sock in (a, b):
            self._interest(sock)

    def _on_event(self, sock: socket.socket, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(sock)
            if mask & selectors.EVENT_READ:
                self._move(sock)
        except OSError:  # a reset on either side ends the connection both ways
            self._close()
            return
        if not self.open_reading and not any(self.pending.values()):
            self._close()
            return
        for each in self.peer:
            self._interest(each)

    def _move(self, source: socket.socket) -> None:
        data = source.recv(CHUNK)
        target = self.peer[source]
        if not data:
            self.open_reading.discard(source)
            if not self.pending[target]:
                target.shutdown(socket.SHUT_WR)
            return
        self.pending[target] = data
        self._flush(target)

    def _flush(self, target: socket.socket) -> None:
        data = self.pending[target]
        try:
            sent = target.send(data)
        except BlockingIOError:
            sent = 0
        self.pending[target] = data[sent:]
        if not self.pending[target] and self.peer[target] not in self.open_reading:
            target.shutdown(socket.SHUT_WR)  # its source ended: pass the end on

    def _interest(self, sock: socket.socket) -> None:
        wanted = (selectors.EVENT_READ if sock in self.open_reading
                  and not self.pending[self.peer[sock]] else 0) \
            | (selectors.EVENT_WRITE if self.pending[sock] else 0)
        had = self.registered.get(sock, 0)
        if wanted == had:
            return
        if not wanted:
            self.selector.unregister(sock)
        elif not had:
            self.selector.register(sock, wanted, self._on_event)
        else:
            self.selector.modify(sock, wanted, self._on_event)
        self.registered[sock] = wanted

    def _close(self) -> None:
        for sock in self.peer:
            if self.registered.pop(sock, 0):
                self.selector.unregister(sock)
            sock.close()


def probe(port: int) -> int:
    """Whether `port` accepts a connection on this network namespace's loopback: 0, or the
    errno of the refusal."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            return sock.connect_ex(("127.0.0.1", port))
        except OSError as error:  # a timeout (socket.timeout) among them
            return error.errno or errno.ETIMEDOUT
