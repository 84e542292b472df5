"""The OCI distribution API, the part a pull needs: a manifest by tag or digest (Docker schema
2 or OCI; a manifest list or OCI index resolved to one platform's), and blobs streamed with
their digest checked as they arrive.

Everything a registry sends is untrusted: a manifest bigger than `MAX_MANIFEST` is refused
before it is parsed, a blob whose bytes do not hash to its digest (or run past its size)
raises `DigestMismatchError` naming the digest, and the caller keeps nothing of it.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import platform as host_platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pytest_minictr.errors import ConfigError
from pytest_minictr.images.auth import credentials_for
from pytest_minictr.images.reference import DIGEST_RE, DOCKER_HUB, Reference
from pytest_minictr.images.transport import RegistryError, Transport

MAX_MANIFEST = 4 << 20   # containerd's limit: real manifests are a few kB
MAX_CONFIG = 8 << 20
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFESTS = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEXES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join((*MANIFESTS, *INDEXES))
# uname's machine -> the OCI (Go) architecture, variant
ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                 "armv7l": "arm/v7", "armv6l": "arm/v6", "i686": "386", "i386": "386",
                 "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


class DigestMismatchError(RegistryError):
    """A blob's bytes do not hash to the digest it was asked by."""


class BlobInterruptedError(RegistryError):
    """The connection broke before the blob's last byte: worth another try."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """One platform's image manifest: its digest, config blob and layers, bottom first."""

    digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    platform: str


def host_platform_name() -> str:
    """This machine's platform as OCI names it: `linux/amd64`, `linux/arm/v7`."""
    machine = host_platform.machine()
    return f"linux/{ARCHITECTURES.get(machine, machine)}"


def normalize_platform(text: str) -> str:
    """`linux/arm64/v8` is `linux/arm64`; `os/arch[/variant]` checked; ConfigError if not."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"--platform {text!r}: give os/architecture[/variant], "
                          "as linux/amd64 or linux/arm/v7")
    if parts[1] == "arm64" and parts[2:] == ["v8"]:
        parts = parts[:2]
    return "/".join(parts)


def check_runnable(platform: str) -> None:
    """A pull for another architecture would give binaries this kernel cannot execute:
    minictr does not emulate (no qemu-user), so it says so before downloading anything."""
    if platform != host_platform_name():
        raise ConfigError(f"platform {platform}: this machine runs {host_platform_name()}, "
                          "and minictr does not emulate other architectures")


class RegistryClient:
    """One repository of one registry, as `reference` names it."""

    def __init__(self, reference: Reference):
        self.reference = reference
        self.transport = Transport(reference.api_host, credentials_for(reference.registry))

    def manifest(self, platform: str) -> Manifest:
        """The manifest the reference names, for `platform` if it names an index: from the
        first of Docker Hub's mirrors that has it, else from the registry itself (whose
        transport then serves the blobs too)."""
        for mirror in mirrors_for(self.reference):
            try:
                registry = self.transport
                self.transport = Transport(mirror, credentials_for(mirror))
                return self._manifest(platform)
            except RegistryError:  # (a mirror may lack an image, or be down: Docker's rule)
                self.transport = registry
        return self._manifest(platform)

    def _manifest(self, platform: str) -> Manifest:
        document, media_type, digest = self._manifest_document(self.reference.version)
        if media_type in INDEXES or "manifests" in document:
            chosen = _choose(document.get("manifests") or [], platform, str(self.reference))
            document, media_type, digest = self._manifest_document(chosen)
        if not isinstance(document.get("layers"), list) or "config" not in document:
            raise RegistryError(f"{self.reference}: the manifest ({media_type or 'no type'}) "
                                "is not a schema 2 or OCI image manifest (schema 1 is not "
                                "supported)")
        return Manifest(digest, _descriptor(document["config"]),
                        tuple(_descriptor(layer) for layer in document["layers"]), platform)

    def config(self, descriptor: Descriptor) -> tuple[bytes, dict[str, Any]]:
        """The config blob (its bytes, checked against its digest, and its JSON)."""
        if descriptor.size > MAX_CONFIG:
            raise RegistryError(f"{self.reference}: config blob of {descriptor.size} bytes "
                                f"refused (more than {MAX_CONFIG})")
        with self.blob(descriptor) as stream:
            data = stream.read()
        try:
            document = json.loads(data)
        except ValueError:
            raise RegistryError(f"{self.reference}: its config blob is not JSON") from None
        return data, document if isinstance(document, dict) else {}

    def blob(self, descriptor: Descriptor,
             progress: Callable[[int], None] | None = None) -> io.BufferedReader:
        """The blob's bytes as they come; reading past its end checks its digest.
        `progress(bytes so far)` is called as they arrive."""
        response = self.transport.get(f"/v2/{self.reference.repository}/blobs/"
                                      f"{descriptor.digest}")
        return io.BufferedReader(VerifyingReader(response, descriptor, progress), 1 << 20)

    def _manifest_document(self, version: str) -> tuple[dict[str, Any], str, str]:
        response = self.transport.get(f"/v2/{self.reference.repository}/manifests/{version}",
                                      ACCEPT)
        with response:
            data = response.read(MAX_MANIFEST + 1)
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if len(data) > MAX_MANIFEST:
            raise RegistryError(f"{self.reference}: manifest refused, more than "
                                f"{MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if DIGEST_RE.fullmatch(version) and version != digest:
            raise DigestMismatchError(f"{self.reference}: the manifest sent for {version} "
                                      f"hashes to {digest}")
        try:
            document = json.loads(data)
        except ValueError:
            raise RegistryError(f"{self.reference}: the manifest is not JSON") from None
        if not isinstance(document, dict):
            raise RegistryError(f"{self.reference}: the manifest is not a JSON object")
        return document, document.get("mediaType") or media_type, digest


def mirrors_for(reference: Reference) -> list[str]:
    """$MINICTR_REGISTRY_MIRRORS (comma-separated `host[:port]`), tried in order before
    Docker Hub, for Docker Hub's images only (as Docker's `registry-mirrors`): a way around
    its pull rate limits."""
    if reference.registry != DOCKER_HUB:
        return []
    return [host.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
            for host in os.environ.get("MINICTR_REGISTRY_MIRRORS", "").split(",")
            if host.strip()]


def _choose(entries: Any, platform: str, name: str) -> str:
    """The digest of the index's manifest for `platform`."""
    offered: dict[str, str] = {}
    for entry in entries if isinstance(entries, list) else ():
        text = _platform_of(entry)
        # buildkit's attestations are 'unknown/unknown'
        if text and "unknown" not in text and DIGEST_RE.fullmatch(str(entry.get("digest"))):
            offered.setdefault(text, entry["digest"])
    if platform not in offered:
        raise ConfigError(f"{name} has no image for {platform} (it has: "
                          f"{', '.join(sorted(offered)) or 'none'})")
    return offered[platform]


def _platform_of(entry: Any) -> str:
    """An index entry's `os/architecture[/variant]`, normalised; '' if it names none."""
    wanted = entry.get("platform") if isinstance(entry, dict) else None
    if not isinstance(wanted, dict):
        return ""
    parts = [wanted.get("os"), wanted.get("architecture"), wanted.get("variant")]
    if not all(isinstance(part, str) and "/" not in part for part in parts[:2]) \
            or not isinstance(parts[2], (str, type(None))):
        return ""
    try:
        return normalize_platform("/".join(part for part in parts if part))
    except ConfigError:
        return ""


def _descriptor(entry: Any) -> Descriptor:
    if not isinstance(entry, dict) or not DIGEST_RE.fullmatch(str(entry.get("digest", ""))) \
            or not isinstance(entry.get("size"), int) or entry["size"] < 0:
        raise RegistryError(f"a manifest's descriptor is malformed: {str(entry)[:200]}")
    return Descriptor(str(entry.get("mediaType", "")), entry["digest"], entry["size"])


class VerifyingReader(io.RawIOBase):
    """A blob's response, hashed as it is read: its end (or a byte past its size) raises
    DigestMismatchError unless the bytes were the digest's."""

    def __init__(self, response: Any, descriptor: Descriptor,
                 progress: Callable[[int], None] | None = None):
        self.response = response
        self.progress = progress
        self.descriptor = descriptor
        algorithm = descriptor.digest.partition(":")[0]
        self.hash = hashlib.new(algorithm)
        self.seen = 0
        self.checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            count = int(self.response.readinto(buffer))
        except (OSError, http.client.HTTPException) as error:
            raise BlobInterruptedError(f"blob {self.descriptor.digest}: the connection broke "
                                       f"after {self.seen} bytes ({error!r})") from None
        if count == 0 and self.seen < self.descriptor.size:
            raise BlobInterruptedError(f"blob {self.descriptor.digest}: the connection ended "
                                       f"after {self.seen} of {self.descriptor.size} bytes")
        self.seen += count
        if self.seen > self.descriptor.size:
            self._mismatch(f"more than its {self.descriptor.size} bytes")
        self.hash.update(memoryview(buffer)[:count])
        if self.progress is not None:
            self.progress(self.seen)
        if count == 0 and not self.checked:
            self.checked = True
            actual = f"{self.descriptor.digest.partition(':')[0]}:{self.hash.hexdigest()}"
            if actual != self.descriptor.digest:
                self._mismatch(f"{self.seen} bytes that hash to {actual}")
        return count

    def _mismatch(self, what: str) -> None:
        raise DigestMismatchError(f"blob {self.descriptor.digest}: the registry sent {what}; "
                                  "nothing of it was kept")

    def close(self) -> None:
        self.response.close()
        super().close()
