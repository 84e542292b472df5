"""The `minictr_service` factory fixture: servers (PostgreSQL, Redis, your own) in containers,
started by a fixture of the scope you choose and stopped at its end.

    @pytest.fixture(scope="session")
    def pg(minictr_service):
        return minictr_service(recipe="postgresql", ports=[5432], memory="256M",
                               wait_for_port=5432)

The factory is session-scoped (a fixture of any scope may use it); each service it starts is
stopped when the fixture that started it is torn down: the factory learns which fixture calls
it from `pytest_fixture_setup`, the hook around every fixture's setup. Called from a test's
body, the service ends with the test. Under xdist each worker has its own services, on ports
the kernel picks: nothing clashes. A failing test's report shows the log tail of the services
its fixtures started. A service this host cannot run (a limit without cgroups, no user
namespaces) fails or skips the test that needs it, as --minictr-unavailable says.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_minictr.caller.result import tail
from pytest_minictr.caller.runtime import Container, ContainerRuntime
from pytest_minictr.errors import ConfigError, MinictrError, UnsupportedError
from pytest_minictr.images.image import Image
from pytest_minictr.images.resolve import resolve
from pytest_minictr.keywords import BY_NAME
from pytest_minictr.plugin.fixture import unavailable
from pytest_minictr.plugin.settings import SessionSettings
from pytest_minictr.rootfs.builder import RootfsBuilder

Address = tuple[str, int]  # a published (host address, port)
LOG_TAIL = 4096          # bytes of each stream a failed test's report shows
STOP_GRACE = 5.0         # seconds a service has to shut down cleanly at its scope's end
DRAIN_INTERVAL = 0.2     # seconds between two reads of a service's output


@dataclass
class Service:
    """A started service: the fixture whose scope it lives in, and its container."""

    fixture: str
    container: Container

    def log_tail(self) -> str:
        stdout, stderr = self.container.output_so_far()
        return (f"container {self.container.id} {list(self.container.args)!r}, "
                f"{self.container.status}\n--- stdout (tail) ---\n{tail(stdout, LOG_TAIL)}"
                f"\n--- stderr (tail) ---\n{tail(stderr, LOG_TAIL)}")


class ServiceFactory:
    """The fixture's value: call it to start a service."""

    def __init__(self, runtime: ContainerRuntime, builder: RootfsBuilder,
                 current: Callable[[], Any], session: SessionSettings):
        self._runtime = runtime
        self._builder = builder
        self._current = current
        self._session = session
        self.services: list[Service] = []

    def __call__(self, recipe: str | None = None, command: list[str] | None = None, *,
                 binaries: Sequence[str] = (), rootfs: str | None = None,
                 image: str | Image | None = None,
                 wait_for_port: int | None = None, wait_for_output: bytes | None = None,
                 ready_timeout: float = 30, **keywords: Any) -> Container:
        """Start a service and wait until it is ready; returns its Container (`address(port)`,
        `exec()`...). `image` runs an image (its ExposedPorts published unless `ports` says
        otherwise); `recipe` or `binaries` build its rootfs (or give a prepared `rootfs`);
        `command` defaults to the image's or the recipe's. The other keywords are the
        marker's and run()'s (memory="256M", ports=[5432], env=...)."""
        if image is not None:
            root: Any = resolve(image, keywords.get("pull") or "missing")
            keywords.setdefault("ports", list(root.config.exposed_ports))
        else:
            root = rootfs if rootfs is not None else self._builder.build(
                binaries=binaries, recipe=recipe)
        try:
            container = self._runtime.run(root, command, **_library_keywords(keywords))
            problem = None
        except UnsupportedError as error:  # reported outside the handler: no chained traceback
            problem = error
        if problem is not None:
            unavailable(self._session, problem)
        service = Service(self._owner_of(lambda: self._stop(service)), container)
        self.services.append(service)
        _drain_in_background(container)
        try:
            if wait_for_port is not None:
                container.wait_for_port(wait_for_port, timeout=ready_timeout)
            if wait_for_output is not None:
                container.wait_for_output(wait_for_output, timeout=ready_timeout)
        except BaseException:
            self._stop(service)
            raise
        return container

    def _owner_of(self, stop: Callable[[], None]) -> str:
        """The fixture being set up, whose teardown is to `stop` the service; or the test."""
        fixturedef, item = self._current()
        if fixturedef is not None:
            fixturedef.addfinalizer(stop)
            return fixturedef.argname
        if item is None:
            raise ConfigError("minictr_service(): call it from a fixture or a test")
        item.addfinalizer(stop)
        return item.name

    def _stop(self, service: Service) -> None:
        if service in self.services:
            self.services.remove(service)
            service.container.stop(grace=STOP_GRACE)

    def stop_all(self) -> None:
        for service in list(self.services):
            self._stop(service)

    def published(self) -> dict[Address, str]:
        """The published (address, port) of every service started and not stopped yet, and
        the fixture (or test) that started it: what a sandboxed body reaches."""
        return {address: service.fixture for service in self.services
                for address in service.container.published.values()}

    def report_sections(self, item: pytest.Item) -> list[tuple[str, str]]:
        """The log tails of the services of `item`'s fixtures (or of its body)."""
        used = set(getattr(item, "fixturenames", ())) | {item.name}
        return [(f"minictr service {service.fixture}", service.log_tail())
                for service in self.services if service.fixture in used]


def body_network_notes(services: dict[Address, str], network: str, unreachable: list,
                       told: list[dict], refused: bool = False) -> tuple[str, ...]:
    """The "minictr: sandbox network" section of a failed sandboxed test: what its body could
    reach, and what failed on the way (`unreachable`: [address, port, why] from the body's
    setup; `told`: what the relay said), so that a refused connection is not a mystery.
    Without services, only for a failure that says a connection was `refused`."""
    if not services and not refused:
        return ()
    named = {address: f"{_text(address)} ({fixture})" for address, fixture in services.items()}
    if network == "none":
        return ("network='none': the body has no network, not even the services its "
                f"fixtures started ({', '.join(named.values()) or 'none was running'})",)
    missing = {(address, port): why for address, port, why in unreachable}
    no_relay = [str(line["relay"]) for line in told if "relay" in line]
    relayed = [] if no_relay else [name for address, name in named.items()
                                   if address not in missing]
    notes = ["the body has a network namespace of its own: it reaches the services its "
             "fixtures started, at their addresses, and nothing else of the host",
             "relayed into it: " + (", ".join(relayed) if relayed else
                                    "none" if services else "none (no minictr_service runs)")]
    notes += no_relay
    notes += [f"{named.get(address, _text(address))}: {why}" for address, why in missing.items()]
    for line in told:
        if "address" in line:
            address = (line["address"][0], line["address"][1])
            notes.append(f"{named.get(address, _text(address))}: refused on the host "
                         f"({os.strerror(line['errno'])}): is the service down?")
    return tuple(notes)


def _text(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _library_keywords(keywords: dict[str, Any]) -> dict[str, Any]:
    """The marker's names (memory, cpus, pids) as run() spells them (memory_limit...)."""
    named: dict[str, Any] = {}
    for name, value in keywords.items():
        keyword = BY_NAME.get(name)
        library_name = name if keyword is None else keyword.library
        if library_name is None:
            raise ConfigError(f"minictr_service({name}=...): not a keyword of a service")
        named[library_name] = value
    return named


def _drain_in_background(container: Container) -> None:
    """A server that logs fills its pipe (64 KiB) and then blocks if nobody reads: a
    thread reads its output (kept for the report, up to output_limit) until its end."""
    def drain() -> None:
        try:
            while not container._ended_within(DRAIN_INTERVAL):
                pass
        except MinictrError:
            pass  # the launcher is gone: whoever waits for the container hears of it
    threading.Thread(target=drain, name=f"minictr-drain-{container.id}", daemon=True).start()
