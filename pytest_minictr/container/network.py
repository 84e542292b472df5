"""The container's network namespace: its loopback, and the rules inside it that Docker users
expect (low ports, ping) without any capability over the host's network."""

from __future__ import annotations

from pytest_minictr.host import linux


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
