"""pytest-minictr: daemonless Linux containers for tests and untrusted snippets.

    from pytest_minictr import ContainerRuntime, RootfsBuilder
    rootfs = RootfsBuilder().build(binaries=["sh", "echo"])
    with ContainerRuntime() as runtime:
        result = runtime.run(rootfs, ["echo", "hi"]).wait()
"""

from .errors import (CommandNotFoundError, ConfigError, ContainerNotFoundError,
                     ContainerProcessError, ContainerSetupError, LauncherError, MinictrError,
                     RootfsError, UnsupportedError, WaitTimeoutError)
from .rootfs import RootfsBuilder
from .runtime import Container, ContainerRuntime, ContainerStatus, Result
from .spec import ContainerSpec, Limits, Mount, parse_size

__version__ = "0.1.0"

__all__ = [
    "CommandNotFoundError", "ConfigError", "Container", "ContainerNotFoundError",
    "ContainerProcessError", "ContainerRuntime", "ContainerSetupError", "ContainerSpec",
    "ContainerStatus", "LauncherError", "Limits", "MinictrError", "Mount", "Result",
    "RootfsBuilder", "RootfsError", "UnsupportedError", "WaitTimeoutError", "parse_size",
]
