"""The launcher's relay to the services, for its sandboxed test bodies: the port forwarder
(`forwarder.relay`) the other way round.

A body has a network namespace of its own (it must not reach the host's other servers, nor
the internet), yet the services its fixtures started are published on the host's loopback.
So the body's setup makes listeners inside its namespace, at each service's published
(address, port), and hands them over on a socket of the worker's (see `container.network`);
this relay, in the host's network namespace, connects each connection accepted there to the
same address here. The fixture's `address(port)` is then right inside the body too.

- One relay per launcher, forked at the first body that has services (a fork per body
  would cost the launcher ~4 ms of CPU, as much as the rest of a body's start): the launcher
  sends it each body's socket with the addresses that body may reach.
- It never enters a namespace: the listeners were made in the body's, the sockets it makes
  are the host's. It takes only listening TCP sockets at an address the launcher named for
  that body: what a body sends cannot widen its reach.
- A connection the host refused (the service is down) is told back on the body's socket
  (one JSON line per address and errno), before the body can see the connection end; the
  worker reads it after the body's end, for the test's report.
- The worker closes its socket when it is done with the body: the relay then closes that
  body's listeners (they would keep its network namespace alive).
"""

from __future__ import annotations

import json
import os
import socket
from typing import NoReturn

from pytest_minictr.container.init import die_with_parent
from pytest_minictr.forwarder.relay import READ, Address, Relay, Route

MAX_LISTENERS = 250        # one body's services: SCM_RIGHTS carries 253 fds at most
MAX_ORDER = 1 << 16        # bytes of one order from the launcher (the addresses, as JSON)


def run_service_relay(control: int, parent_pidfd: int) -> NoReturn:
    """The relay's whole life, in a child the launcher forked; `control` a SOCK_SEQPACKET
    socket on which each order is the addresses a body may reach, with its socket."""
    code = 1
    try:
        die_with_parent(parent_pidfd, (control,))
        ServiceRelay(socket.socket(fileno=control)).serve()
        code = 0
    finally:
        os._exit(code)


class ServiceRelay(Relay):
    """A relay whose launcher sends it bodies to serve rather than probes."""

    def __init__(self, control: socket.socket):
        super().__init__(control, {})

    def on_control(self, _mask: int) -> None:
        control = self.control
        assert control is not None  # the serve loop runs only while there is one
        try:
            order, fds, _flags, _address = socket.recv_fds(control, MAX_ORDER, 1)
        except OSError:
            order, fds = b"", []
        if not order:
            self.control = None  # the launcher ended us, or is gone
            return
        reachable = frozenset((address, port) for address, port in json.loads(order))
        for fd in fds:
            Body(self, socket.socket(fileno=fd), reachable)


class Body:
    """One body's socket, its listeners and what it was told."""

    def __init__(self, relay: Relay, intake: socket.socket, reachable: frozenset[Address]):
        self.relay = relay
        self.intake = intake
        self.reachable = reachable
        self.listeners: list[socket.socket] = []
        self.told: set[tuple[Address, int]] = set()
        relay.register(intake, READ, self._take_listeners)

    def _take_listeners(self, _mask: int) -> None:
        try:
            data, fds, _flags, _address = socket.recv_fds(self.intake, 64, MAX_LISTENERS)
        except OSError:
            data, fds = b"", []
        for fd in fds:
            listener = socket.socket(fileno=fd)
            target = _listening_address(listener)
            if target in self.reachable:
                self.listeners.append(listener)
                self.relay.listen(listener, Route(target, self.tell_refused))
            else:
                listener.close()
        if not data:  # the worker is done with the body
            self.end()

    def tell_refused(self, target: Address, failure: int) -> None:
        if (target, failure) in self.told:
            return
        self.told.add((target, failure))
        line = json.dumps({"address": list(target), "errno": failure}).encode() + b"\n"
        try:
            self.intake.send(line, socket.MSG_DONTWAIT)
        except OSError:
            pass  # the worker has gone, or stopped reading: nobody to tell

    def end(self) -> None:
        """Its listeners closed (connections still open end when the body's side does)."""
        for sock in (*self.listeners, self.intake):
            self.relay.unregister(sock)
            sock.close()
        self.listeners = []


def _listening_address(sock: socket.socket) -> Address | None:
    """Where `sock` listens, if it is a listening TCP socket; None for anything else."""
    try:
        if sock.type != socket.SOCK_STREAM \
                or sock.family not in (socket.AF_INET, socket.AF_INET6) \
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        address, port = sock.getsockname()[:2]
    except OSError:
        return None
    return address, port
