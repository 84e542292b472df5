"""pytest-minictr: daemonless Linux containers for tests and untrusted snippets.

    from pytest_minictr import ContainerRuntime, RootfsBuilder
    rootfs = RootfsBuilder().build(binaries=["sh", "echo"])
    with ContainerRuntime() as runtime:
        result = runtime.run(rootfs, ["echo", "hi"]).wait()

Names are imported on first use (PEP 562): the launcher process imports only the modules it
needs, which keeps it small, and every container it forks cheaper to copy.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "errors": ["CommandNotFoundError", "ConfigError", "ContainerNotFoundError",
               "ContainerNotReadyError", "ContainerSetupError", "LauncherError", "MinictrError",
               "RootfsError", "RuntimeClosedError",
               "UnsupportedError"],
    "rootfs.builder": ["RootfsBuilder"],
    "caller.runtime": ["Container", "ContainerRuntime"],
    "caller.pods": ["Pod"],
    "caller.result": ["ContainerProcessError", "ContainerStatus", "Result", "WaitTimeoutError"],
    "spec": ["ContainerSpec", "Limits", "Mount"],
    "sizes": ["parse_size"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)  # noqa: PLE0605 - the lazy exports' names, a list


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pytest_minictr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
