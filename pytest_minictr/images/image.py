"""What the rest of the package knows of an image: its layers, unpacked once each in the
store (bottom first, as an overlay stacks them under a container's writable layer), and the
parts of its config a container runs by. The registry client and the store make these; the
runtime, the plugin and the CLI only read them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImageConfig:
    """The image config's `config` object, as Docker reads it (the OCI image spec's names)."""

    env: tuple[str, ...] = ()              # "NAME=value", in the image's order
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""                  # "" = the root
    user: str = ""                         # "name", "uid", "uid:gid" or "name:group"
    exposed_ports: tuple[int, ...] = ()    # TCP ports ("5432/tcp"); UDP ones are not kept
    stop_signal: str = ""                  # "SIGTERM", "SIGQUIT", "15"...
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_oci(cls, config: Mapping[str, Any]) -> ImageConfig:
        """From an image config blob (its JSON decoded): a missing or null field is empty."""
        inner = config.get("config") or {}
        return cls(
            env=tuple(inner.get("Env") or ()),
            entrypoint=tuple(inner.get("Entrypoint") or ()),
            cmd=tuple(inner.get("Cmd") or ()),
            working_dir=inner.get("WorkingDir") or "",
            user=inner.get("User") or "",
            exposed_ports=tuple(sorted(
                int(port.split("/")[0]) for port in (inner.get("ExposedPorts") or {})
                if port.endswith("/tcp") or "/" not in port)),
            stop_signal=inner.get("StopSignal") or "",
            labels=dict(inner.get("Labels") or {}))


@dataclass(frozen=True)
class Image:
    """An image in the store, ready to run: `layers` are its unpacked layer directories,
    bottom first, shared with every other image that has them and never written to."""

    reference: str                 # as asked for, normalised: docker.io/library/alpine:3.20
    digest: str                    # the manifest's: sha256:...
    layers: tuple[Path, ...]
    config: ImageConfig
    platform: str = "linux/amd64"  # os/architecture[/variant] the manifest was chosen for
    size: int = 0                  # bytes of the unpacked layers
