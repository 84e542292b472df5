"""Image references as Docker reads them: `alpine` is `docker.io/library/alpine:latest`.

The grammar is the distribution project's: `[HOST[:PORT]/]PATH[:TAG][@ALGORITHM:HEX]`. The
first component is a registry host only when it holds a `.` or a `:`, or is `localhost`
(`myuser/app` is a Docker Hub repository, `ghcr.io/x/app` is not); path components are lower
case; a reference with neither tag nor digest means `:latest`. Parsing happens once, at the
edge; everything after holds a `Reference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pytest_minictr.errors import ConfigError

DOCKER_HUB = "docker.io"
# Docker Hub's registry API is not served at docker.io itself
DOCKER_HUB_API = "registry-1.docker.io"
HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
HOST_RE = re.compile(_HOST)
TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
MAX_LENGTH = 255  # the path's limit in the distribution spec


@dataclass(frozen=True)
class Reference:
    """One image, named: `registry` (`docker.io`, `ghcr.io`, `127.0.0.1:5000`), `repository`
    (`library/alpine`), and a `tag` and/or a `digest` (`sha256:...`; when both are given the
    digest is what is pulled, as Docker does)."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        text += f":{self.tag}" if self.tag else ""
        return text + (f"@{self.digest}" if self.digest else "")

    @property
    def name(self) -> str:
        """Registry and repository, without tag or digest: `docker.io/library/alpine`."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host (and port) the registry API answers on."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def version(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest, else the tag."""
        return self.digest or self.tag

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)


def parse_reference(text: str) -> Reference:
    """The reference `text` names, Docker's defaults filled in; ConfigError says why not."""
    rest, _, digest = text.partition("@")
    if digest and not DIGEST_RE.fullmatch(digest):
        raise _bad(text, f"the digest {digest!r} is not sha256:<64 hex> (or sha512:<128 hex>)")
    registry, path = _split_registry(rest, text)
    path, tag = _split_tag(path, text)
    if not PATH_RE.fullmatch(path):
        raise _bad(text, "a repository name is lower-case letters, digits and separators "
                         "(. _ __ -) between them, in /-separated parts")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images
    if len(registry) + 1 + len(path) > MAX_LENGTH:
        raise _bad(text, f"the name is longer than {MAX_LENGTH} characters")
    return Reference(registry, path, tag or ("" if digest else DEFAULT_TAG), digest)


def _split_registry(rest: str, text: str) -> tuple[str, str]:
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not HOST_RE.fullmatch(first):
            raise _bad(text, f"{first!r} is not a registry host[:port]")
        return (DOCKER_HUB if first in HUB_ALIASES else first), remainder
    return DOCKER_HUB, rest


def _split_tag(path: str, text: str) -> tuple[str, str]:
    # a ':' after the last '/' starts the tag (one before it belonged to a port)
    name, colon, tag = path.rpartition(":")
    if not colon or "/" in tag:
        return path, ""
    if not TAG_RE.fullmatch(tag):
        raise _bad(text, f"the tag {tag!r} is not letters, digits, '_', '.' and '-' "
                         "(at most 128, not starting with '.' or '-')")
    return name, tag


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"image reference {text!r}: {why}")
