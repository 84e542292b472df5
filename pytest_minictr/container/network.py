"""The container's network namespace: its loopback, and the rules inside it that Docker users
expect (low ports, ping) without any capability over the host's network; in a sandboxed
body's, the services its fixtures started."""

from __future__ import annotations

import socket

from pytest_minictr.container.failure import write_line
from pytest_minictr.host import linux

LISTEN_BACKLOG = 128


def open_low_ports_and_ping() -> None:
    """Binding a port below 1024 takes CAP_NET_BIND_SERVICE over the network namespace, which
    root inside lacks once in its user namespace (the host's owns the network namespace), and
    other uids inside never have: in the container's own network namespace no port is
    privileged (as Docker does), so a server under test can take port 80."""
    linux.write_file("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")
    # and ping (ICMP echo sockets) for every group, without CAP_NET_RAW, as Docker does
    linux.write_file("/proc/sys/net/ipv4/ping_group_range", f"0 {2**31 - 1}")


def own_network(network: str) -> None:
    """A network namespace owned by container root's user namespace (see `security`), in
    place of the one made as host root, for a command that keeps a network capability: it
    counts only there. Low ports need no sysctl in it (root owns it)."""
    linux.unshare(linux.CLONE_NEWNET)
    if network == "loopback":
        linux.set_link_up("lo")


def hand_over_service_addresses(relay: int, addresses: tuple[tuple[str, int], ...],
                                report_fd: int) -> None:
    """A sandboxed body's services, at their published (address, port), in its own network
    namespace: listeners made here (a socket's namespace is the one it is made in), handed to
    the launcher's relay on `relay` (it connects each to the same address on the host, see
    `forwarder.services`), then closed here, before the test runs. An address
    that cannot be had here is not the test's setup failure: the worker names it in the
    test's report (a line {"unreachable": [[address, port, why]]} on `report_fd`)."""
    listeners: list[socket.socket] = []
    unreachable = []
    with socket.socket(fileno=relay) as intake:
        try:
            for address, port in addresses:
                try:
                    listeners.append(_listen_at(address, port))
                except OSError as error:
                    unreachable.append([address, port, f"cannot listen on it in the "
                                        f"sandbox: {error.strerror}"])
            if listeners:
                socket.send_fds(intake, [b"L"], [sock.fileno() for sock in listeners])
        except OSError as error:
            unreachable += [[*sock.getsockname()[:2], f"no relay to the host: {error.strerror}"]
                            for sock in listeners]
        finally:
            for sock in listeners:
                sock.close()
    if unreachable:
        write_line(report_fd, {"unreachable": unreachable})


def _listen_at(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
