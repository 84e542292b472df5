"""The `container` fixture's value: commands in fresh containers on one test's own writable
layer, specs built from the test's checked settings (nothing is checked twice)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from pytest_minictr.caller.result import ContainerStats, Result
from pytest_minictr.caller.runtime import Container, ContainerRuntime
from pytest_minictr.errors import ConfigError, MinictrError, UnsupportedError
from pytest_minictr.images.image import Image
from pytest_minictr.keywords import BY_NAME, ContainerSettings, spec_from
from pytest_minictr.plugin.host import LAYER_PREFIX, layer_parent, remove_layer
from pytest_minictr.plugin.settings import SessionSettings

LAST_RESULT = pytest.StashKey[Result]()


class TestContainer:
    """The `container` fixture's value: run commands in fresh containers that share this
    test's writable layer on top of the (read-only, shared) `rootfs`; or start one in the
    background and exec commands beside it."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, runtime: ContainerRuntime, rootfs: Path | Image,
                 settings: ContainerSettings,
                 item: pytest.Item, session: SessionSettings):
        self.rootfs = rootfs
        self.settings = settings
        self._runtime = runtime
        self._item = item
        self._session = session
        self._layer: str | None = None
        self._started: Container | None = None

    def run(self, cmd: str | Sequence[str], input: bytes | None = None,
            timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        """Run `cmd` (a list, or a string for /bin/sh -c) and return its Result. `timeout`
        overrides the marker's; `env` adds to its environment."""
        if self._started is not None and self._started.status == "running":
            raise ConfigError("container.run() while container.start()'s command runs on this "
                              "test's layer: use container.exec() to run beside it, or "
                              "container.stop() it first")
        return self._remember(self._launch(cmd, input, self._timeout(timeout), env).wait())

    def start(self, cmd: str | Sequence[str], env: Mapping[str, str] | None = None) -> Container:
        """Start `cmd` in the background (a server, a daemon under test) on this test's
        layer, with no time limit; `exec()` runs commands beside it. Stopped after the test."""
        if self._started is not None and self._started.status == "running":
            raise ConfigError("container.start(): this test's container already runs; "
                              "container.stop() it first")
        self._started = self._launch(cmd, None, None, env)
        return self._started

    def exec(self, cmd: str | Sequence[str], input: bytes | None = None,
             timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        """Run `cmd` inside the container start() started (its namespaces, files, loopback);
        its Result. `timeout` overrides the marker's."""
        if self._started is None:
            raise ConfigError("container.exec() runs beside a command started with "
                              "container.start(): start one first")
        return self._remember(self._started.exec(_argv(cmd), input=input,
                                                 timeout=timeout or self.settings.timeout,
                                                 env=env))

    def stop(self) -> Result:
        """Stop what start() started (SIGTERM, then SIGKILL after a grace); its Result."""
        if self._started is None:
            raise ConfigError("container.stop(): nothing was started with container.start()")
        return self._remember(self._started.stop())

    def stats(self) -> ContainerStats:
        """The started container's figures now (memory, CPU time, processes, limits)."""
        if self._started is None:
            raise ConfigError("container.stats(): nothing was started with container.start()")
        return self._started.stats()

    def _launch(self, cmd: str | Sequence[str], input: bytes | None, timeout: float | None,
                env: Mapping[str, str] | None) -> Container:
        """`env` comes with the call, so it is checked here; the settings were checked when
        the fixture was set up."""
        settings = vars(self.settings)
        spec = spec_from(self.rootfs, _argv(cmd), {
            **settings, "timeout": timeout,
            "env": {**(settings["env"] or {}), **(BY_NAME["env"].validate(env, "env") or {})},
            "layer": self._writable_layer()})
        try:
            container = self._runtime.launch(spec, input=input)
        except UnsupportedError as problem:
            unsupported = problem
        else:
            return container
        unavailable(self._session, unsupported)  # outside the handler: no chained traceback

    def _timeout(self, timeout: float | None) -> float | None:
        """The call's own timeout, checked (it comes with the call), else the settings'."""
        return BY_NAME["timeout"].validate(timeout, "timeout") if timeout \
            else self.settings.timeout

    def _remember(self, result: Result) -> Result:
        self._item.stash[LAST_RESULT] = result
        return result

    def _writable_layer(self) -> str:
        if self._layer is None:
            self._layer = tempfile.mkdtemp(prefix=f"{LAYER_PREFIX}{os.getpid()}-",
                                           dir=layer_parent())
        return self._layer

    def close(self) -> None:
        if self._started is not None:
            try:
                self._started.kill()
            except MinictrError:
                pass  # a dead launcher took it along; the test's report says so already
            self._started = None
        if self._layer is not None:
            remove_layer(self._layer)
            self._layer = None


def unavailable(session: SessionSettings, problem: Exception) -> NoReturn:
    message = f"minictr cannot run containers here: {problem}"
    if session.unavailable == "skip":
        pytest.skip(message)
    pytest.fail(message + " (--minictr-unavailable=skip skips such tests)", pytrace=False)


def _argv(cmd: str | Sequence[str]) -> Sequence[str]:
    return ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else cmd
