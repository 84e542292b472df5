"""One warm `ContainerRuntime` (and the python3 rootfs) per process, made on first use.

A runtime's first container pays for its launcher, zygote and spares (tens of milliseconds);
every later one starts in a couple. A grader's worker (a thread pool's, a Ray worker process)
keeps one for its whole life. The runtime is keyed by the process id: a forked child (a
multiprocessing worker) must not talk to its parent's launcher over a socket it shares.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from pytest_minictr import ContainerRuntime, RootfsBuilder


@dataclass(frozen=True)
class Warm:
    pid: int
    runtime: ContainerRuntime
    rootfs: str


_lock = threading.Lock()
_runtimes: dict[int, ContainerRuntime] = {}
_warm: dict[tuple[int, str], Warm] = {}


def process_runtime() -> ContainerRuntime:
    """This process's runtime, made on first use (and again in a forked child)."""
    with _lock:
        return _runtimes.get(os.getpid()) or _runtimes.setdefault(os.getpid(),
                                                                  ContainerRuntime())


def warm_runtime(recipe: str = "python3") -> Warm:
    """This process's runtime and the rootfs of `recipe` (built once, cached on disk)."""
    runtime = process_runtime()
    key = (os.getpid(), recipe)
    with _lock:
        if key not in _warm:
            _warm[key] = Warm(os.getpid(), runtime, str(RootfsBuilder().build(recipe=recipe)))
        return _warm[key]
