"""A named container in the foreground (`minictr run --name NAME`, without -d), as Docker has
it: while `run` waits for it, it is recorded as a detached one is and `run` serves its control
socket, so that `ps`, `inspect`, `exec`, `stats`, `stop` and `kill` reach it from another
shell; its end is recorded (`ps -a` lists it as exited) and, with --rm, its record removed.
Its output goes to `run`'s own stdout and stderr, so no logs are kept.

Without --name nothing is recorded: a foreground run is not listed (with or without --rm).
"""

from __future__ import annotations

import socket
from types import TracebackType

from pytest_minictr.caller.result import Result
from pytest_minictr.caller.runtime import Container, ContainerRuntime
from pytest_minictr.cli.detached import shim
from pytest_minictr.cli.detached.commands import as_json
from pytest_minictr.cli.detached.records import Record, Store
from pytest_minictr.spec import ContainerSpec


class ForegroundRecord:
    """The record of a foreground run, if it is named: made on entry (the name claimed before
    the container starts), held while it runs, its end written; removed on an exit before
    the container started."""

    def __init__(self, spec: ContainerSpec, options: dict, name: str | None, remove: bool,
                 image: str = ""):
        self.spec, self.options, self.name, self.remove = spec, options, name, remove
        self.image = image
        self.store = Store()
        self.record: Record | None = None
        self.server: socket.socket | None = None

    def __enter__(self) -> ForegroundRecord:
        if self.name is not None:
            self.record = self.store.new(self.spec.argv, self.spec.rootfs,
                                         as_json(self.options), self.name, self.remove,
                                         logs=False, image=self.image)
        return self

    def hold(self, runtime: ContainerRuntime, container: Container, asked: list[int]) -> None:
        """The container runs: reachable from now on (`asked` gets the signals sent to it)."""
        if self.record is not None:
            self.server = shim.hold(self.store, self.record.id, runtime, container, asked)

    def ended(self, container: Container, result: Result) -> None:
        if self.record is not None and self.server is not None:
            shim.record_end(self.store, self.record.id, container, result, self.server)
            self.record = None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.record is None:
            return
        if self.server is None:  # it never started (a bad spec, a refused limit)
            self.store.remove(self.record.id)
        else:  # interrupted while it ran: the runtime kills it
            self.server.close()
            self.store.update(self.record.id, status="exited")
            if self.remove:
                self.store.remove(self.record.id)
