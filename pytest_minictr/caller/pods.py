"""Pods and published addresses, from the caller.

`Container.address(port)` and `Pod.address(port)` read what the launcher bound (see
`launcher.pods`). A pod (`runtime.pod()`) is several containers in one network namespace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_minictr import protocol
from pytest_minictr.errors import ConfigError
from pytest_minictr.ports import Port, as_dicts, check_ports

if TYPE_CHECKING:
    from pytest_minictr.caller.runtime import ContainerRuntime

Published = dict[int, tuple[str, int]]


def published_of(reply_ports: list) -> Published:
    return {port: (address, host_port) for port, address, host_port in reply_ports}


def address_of(published: Published, port: Any, owner: str) -> tuple[str, int]:
    """(host address, host port) where container port `port` is reached from here."""
    if port not in published:
        known = ", ".join(map(str, published)) or "none"
        raise ConfigError(f"{owner}: port {port!r} is not published (published: {known}; "
                          "publish it with ports=[...])")
    return published[port]


class Pod:
    """Containers that share one network namespace (`runtime.run(..., pod=pod)`): they reach
    each other on 127.0.0.1; each keeps its own PID, mount, IPC and UTS namespaces, cgroup
    and limits. The pod's ports are published once it is made; its namespace ends with its
    last container (a pod is used once: make another for a new set)."""

    def __init__(self, runtime: ContainerRuntime, pod_id: str, published: Published):
        self.pod_id = pod_id
        self.published = published
        self._runtime = runtime

    def __repr__(self) -> str:
        return f"<Pod {self.pod_id} ports={self.published}>"

    def address(self, port: int) -> tuple[str, int]:
        return address_of(self.published, port, f"pod {self.pod_id}")

    def close(self) -> None:
        """Let go of the pod's ports if no container ever joined it (one that did ends
        with its last container)."""
        self._runtime._client.call(protocol.END_POD, pod=self.pod_id)


def make_pod(runtime: ContainerRuntime, pod_id: str, ports: Any) -> Pod:
    checked: tuple[Port, ...] = check_ports(ports)
    reply = runtime._client.call(protocol.POD, pod=pod_id, ports=as_dicts(checked))
    return Pod(runtime, pod_id, published_of(reply["ports"]))
