"""Each keyword that loosens the defaults lets through what it names, and only that; what it
opens stays inside the container's namespaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import host_mount_points, key_users_in_container_range

pytestmark = pytest.mark.usefixtures("no_leftovers")


def test_seccomp_false_allows_a_nested_user_namespace_but_not_the_hosts_proc(escapes):
    """Without the filter the kernel lets container root make user namespaces (no capability
    is needed for that); root of the nested one still holds nothing over the PID namespace,
    owned by the host, so it cannot mount a /proc of its own."""
    before = host_mount_points()
    assert escapes([["syscall", "unshare_user"], ["syscall", "clone_user"], ["userns_proc"]],
                   seccomp=False) == ["ALLOWED", "ALLOWED", "BLOCKED EPERM at mount"]
    assert host_mount_points() == before


def test_allow_syscalls_lets_only_the_named_call_through(escapes):
    """allow_syscalls=["keyctl"]: keyctl works (on the container's own session keyring, made
    by the init); add_key, not named, is still denied."""
    assert escapes([["syscall", "keyctl"], ["syscall", "add_key"]],
                   allow_syscalls=["keyctl"]) == ["ALLOWED", "BLOCKED EPERM"]
    assert key_users_in_container_range() == []  # no key made for container root's host uid


@pytest.mark.parametrize("user", [None, False], ids=["default", "host-root"])
def test_capabilities_net_raw_opens_raw_sockets_on_the_containers_loopback_only(
        runtime, escape_rootfs, user):
    """capabilities=["NET_RAW"] lets raw and packet sockets open. By default the container
    then gets a network namespace owned by its own user namespace (a capability counts only
    there); either way they see only the container's loopback, not the host's interfaces."""
    script = "escape raw_socket packet; escape raw_socket inet; cat /proc/net/dev"
    result = runtime.run(escape_rootfs, ["sh", "-c", script], capabilities=["NET_RAW"],
                         user=user, timeout=30).wait()
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["ALLOWED", "ALLOWED"]
    assert [line.split(":")[0].strip() for line in lines[4:]] == ["lo"]
    host_interfaces = [line.split(":")[0].strip()
                       for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    assert "lo" in host_interfaces


def test_without_net_raw_ping_sockets_work_for_everyone(escape):
    """ICMP echo ("ping") sockets are open to every group in the container's network
    namespace, as with Docker: ping needs no raw socket."""
    assert escape("ping_socket") == "ALLOWED"
