"""Registry credentials: where they are read from, and `minictr login`/`logout`.

Looked up in this order, the first file that names the registry wins:
1. the login file: `$REGISTRY_AUTH_FILE` (podman's variable) if set, else minictr's own,
   `$XDG_CONFIG_HOME/minictr/auth.json` (~/.config/...); `minictr login` writes there;
2. Docker's, `$DOCKER_CONFIG/config.json` else `~/.docker/config.json`.
All have Docker's shape: `{"auths": {"HOST": {"auth": base64("user:password")}}}`
(`username`/`password` keys are read too). Docker's credential helpers (`credsStore`,
`credHelpers`) are not run: a registry only they know is pulled anonymously.

A password is never printed, logged or put in an error message: `Credentials` hides it
from repr(), and the files are written 0600 by one rename.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_minictr.errors import ConfigError
from pytest_minictr.images.reference import DOCKER_HUB, HUB_ALIASES

# the keys Docker has written for Docker Hub over the years
HUB_KEYS = ("https://index.docker.io/v1/", *sorted(HUB_ALIASES))


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        """The value of an `Authorization: Basic` header."""
        return "Basic " + _encode(self)


def login_file() -> Path:
    """Where `minictr login` writes: $REGISTRY_AUTH_FILE, else minictr's own auth.json."""
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return Path(os.environ["REGISTRY_AUTH_FILE"])
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "minictr" / "auth.json"


def docker_config_file() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


def credentials_for(registry: str) -> Credentials | None:
    """The credentials the first auth file holds for `registry` (`docker.io`, `host:port`)."""
    for path in (login_file(), docker_config_file()):
        auths = _read(path).get("auths") or {}
        for key in _keys_of(registry):
            if isinstance(auths.get(key), dict):
                return _decode(auths[key], path, key)
    return None


def login(registry: str, credentials: Credentials) -> Path:
    """Keep the credentials for `registry` in the login file; its path."""
    path = login_file()
    document = _read(path)
    auths = document.setdefault("auths", {})
    for key in _keys_of(registry):
        auths.pop(key, None)
    auths[_keys_of(registry)[0]] = {"auth": _encode(credentials)}
    _write(path, document)
    return path


def logout(registry: str) -> bool:
    """Forget what the login file holds for `registry`; whether it held anything."""
    path = login_file()
    document = _read(path)
    auths = document.get("auths") or {}
    found = [key for key in _keys_of(registry) if key in auths]
    for key in found:
        del auths[key]
    if found:
        _write(path, document)
    return bool(found)


def _keys_of(registry: str) -> tuple[str, ...]:
    if registry == DOCKER_HUB:
        return HUB_KEYS
    return registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"


def _encode(credentials: Credentials) -> str:
    return base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()


def _decode(entry: dict[str, Any], path: Path, key: str) -> Credentials | None:
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    if not entry.get("auth"):
        return None  # an entry kept by a credential helper: nothing we can use
    try:
        user, colon, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, TypeError):
        user, colon, password = "", "", ""
    if not colon:  # (the value is a secret: the message never shows it)
        raise ConfigError(f"{path}: the `auth` of {key!r} is not base64 of 'user:password'")
    return Credentials(user, password)


def _read(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read it as an auth file ({type(error).__name__}); "
                          "fix or remove it") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: an auth file is a JSON object with an `auths` key")
    return document


def _write(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out, indent=1)
    os.replace(tmp, path)
