"""Published ports: which port inside a container's network namespace is reachable from the
caller, at which host address and port. Values and their checks, shared by every front end.

    ports=[5432]                      127.0.0.1:<a free port> -> 5432 inside
    ports={5432: 15432}               127.0.0.1:15432         -> 5432 inside
    ports={5432: ("0.0.0.0", 15432)}  every interface (asked for explicitly)
    ports=["8080:80", "127.0.0.1::6379"]   docker's -p syntax: [ADDRESS:][HOST_PORT:]PORT

Loopback is the default host address: docker's default (every interface) publishes a test
database to the whole network, a well-known footgun.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_minictr.errors import ConfigError

LOOPBACK = "127.0.0.1"
DOCKER_SYNTAX = "[ADDRESS:][HOST_PORT:]PORT, e.g. 8080:80 or 127.0.0.1::6379"


@dataclass(frozen=True)
class Port:
    """One published port: `container_port` inside, `host_port` on `host_address` outside
    (0: a free port the kernel picks, so that parallel test runs never clash)."""

    container_port: int
    host_port: int = 0
    host_address: str = LOOPBACK


def check_ports(value: Any, name: str = "ports") -> tuple[Port, ...]:
    """A list of ports (ints or docker's strings), or a dict {container port: host port or
    (address, host port)}, as a tuple of Port; ConfigError names the bad item."""
    if isinstance(value, Mapping):
        ports = tuple(_port_of_item(name, inside, outside) for inside, outside in value.items())
    elif isinstance(value, (list, tuple)):
        ports = tuple(_port_of_item(name, item) for item in value)
    else:
        raise ConfigError(f"{name}={value!r}: expected a list of ports, e.g. [5432], or a dict "
                          "{container port: host port}")
    inside = [port.container_port for port in ports]
    twice = sorted({p for p in inside if inside.count(p) > 1})
    if twice:
        raise ConfigError(f"{name}={value!r}: container port {twice[0]} is published twice")
    return ports


def parse_docker_port(text: str, name: str = "-p") -> Port:
    """docker's `-p` text: PORT, HOST_PORT:PORT or ADDRESS:[HOST_PORT]:PORT."""
    parts = text.rsplit(":", 2)
    if len(parts) == 1:
        return _port(name, text, text, 0, LOOPBACK)
    if len(parts) == 2:
        return _port(name, text, parts[1], parts[0], LOOPBACK)
    address, host, inside = parts
    return _port(name, text, inside, host or 0, address.strip("[]"))


def check_docker_text(text: str, name: str) -> str:
    """A `-p` flag's text, checked and kept as text (a detached container's record keeps
    the flags as given)."""
    parse_docker_port(text, name)
    return text


def _port_of_item(name: str, item: Any, outside: Any = 0) -> Port:
    if isinstance(item, Port) and not outside:
        return _port(name, item, item.container_port, item.host_port, item.host_address)
    if isinstance(item, str):
        if outside:
            raise ConfigError(f"{name}: {item!r}: a dict maps container ports (ints) to host "
                              "ports")
        return parse_docker_port(item, name)
    if isinstance(outside, tuple) and len(outside) == 2:
        address, host = outside
        return _port(name, (item, outside), item, host, address)
    return _port(name, (item, outside) if outside else item, item, outside, LOOPBACK)


def _port(name: str, given: Any, inside: Any, host: Any, address: Any) -> Port:
    return Port(_number(name, given, inside, 1), _number(name, given, host, 0),
                _address(name, given, address))


def _number(name: str, given: Any, value: Any, lowest: int) -> int:
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= 65535:
        raise ConfigError(f"{name}: {given!r}: expected ports from {lowest} to 65535 "
                          f"({DOCKER_SYNTAX})")
    return value


def _address(name: str, given: Any, value: Any) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{name}: {given!r}: {value!r} is no IP address (the default "
                          f"is {LOOPBACK}; 0.0.0.0 publishes on every interface)") from None


def as_dicts(ports: tuple[Port, ...]) -> list[dict[str, Any]]:
    return [vars(port).copy() for port in ports]


def from_dicts(data: list[dict[str, Any]]) -> tuple[Port, ...]:
    return tuple(Port(**port) for port in data)
