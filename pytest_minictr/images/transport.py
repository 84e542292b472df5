"""HTTP to one registry, stdlib only (urllib): the scheme it may be spoken in, its auth
challenges answered, transient failures retried, redirects followed (bounded).

- TLS with the system's CAs; plain HTTP only to a loopback registry or one named in
  `MINICTR_INSECURE_REGISTRIES` (comma-separated `host[:port]`): Docker's rule.
- A 401 is answered as its `WWW-Authenticate` challenge asks: `Bearer` by fetching a token
  from its realm (anonymously, or with the registry's credentials), `Basic` with them.
- The `Authorization` header is never carried across a redirect: blob storage (S3 and the
  like) gets a signed URL, not our token or password.
- Connection failures, timeouts, 429 and 5xx are retried a few times with a short backoff.
- `$https_proxy`/`$http_proxy` are used as urllib reads them, except for a loopback registry.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from http.client import HTTPResponse
from typing import Any

from pytest_minictr.errors import MinictrError
from pytest_minictr.images.auth import Credentials

TIMEOUT = 30.0
ATTEMPTS = 4
BACKOFF = 0.25           # seconds before the second attempt, doubled after each
MAX_REDIRECTS = 5
MAX_TOKEN = 1 << 20      # a token response bigger than this is not one
TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})


class RegistryError(MinictrError):
    """A registry refused, failed, or answered what an image may not hold."""


def is_insecure_allowed(host: str) -> bool:
    """Whether `host[:port]` may be spoken to in plain HTTP: loopback, or listed."""
    listed = {entry.strip() for entry in
              os.environ.get("MINICTR_INSECURE_REGISTRIES", "").split(",") if entry.strip()}
    bare = re.sub(r":[0-9]+$", "", host).strip("[]")
    return host in listed or bare in listed or is_loopback(host)


def is_loopback(host: str) -> bool:
    bare = re.sub(r":[0-9]+$", "", host).strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


class _BoundedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS
    max_repeats = 1


class Transport:
    """Requests to one registry host, with its credentials (None: anonymous)."""

    def __init__(self, host: str, credentials: Credentials | None = None):
        self.host = host
        self.base = f"{'http' if is_insecure_allowed(host) else 'https'}://{host}"
        self.credentials = credentials
        self.authorization = ""  # the header that last worked, reused by every thread
        handlers: list[urllib.request.BaseHandler] = [
            _BoundedRedirects(), urllib.request.HTTPSHandler(context=ssl.create_default_context())]
        if is_loopback(host):  # $http_proxy (CI sets one) cannot reach our own loopback
            handlers.append(urllib.request.ProxyHandler({}))
        self.opener = urllib.request.build_opener(*handlers)

    def get(self, path: str, accept: str = "") -> HTTPResponse:
        """GET base+path, authenticated as the registry asks; a 2xx response (to be closed)."""
        headers = {"Accept": accept} if accept else {}
        url = self.base + path
        response = self._open(url, headers)
        if isinstance(response, urllib.error.HTTPError) and response.code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            self.authorization = self._answer(challenge, url)
            response = self._open(url, headers)
        if isinstance(response, urllib.error.HTTPError):
            raise self._refusal(response, url)
        return response

    def _open(self, url: str, headers: Mapping[str, str]) -> Any:
        for attempt in range(ATTEMPTS):
            request = urllib.request.Request(url, headers=dict(headers))
            if self.authorization:
                request.add_unredirected_header("Authorization", self.authorization)
            try:
                return self.opener.open(request, timeout=TIMEOUT)
            except urllib.error.HTTPError as error:
                if 300 <= error.code < 400:
                    raise RegistryError(f"GET {url}: a redirect loop, or more than "
                                        f"{MAX_REDIRECTS} redirects") from None
                if error.code not in TRANSIENT or attempt == ATTEMPTS - 1:
                    return error
                error.close()
            except (urllib.error.URLError, OSError) as error:
                if attempt == ATTEMPTS - 1:
                    reason = getattr(error, "reason", error)
                    raise RegistryError(f"GET {url}: {reason} (after {ATTEMPTS} attempts)") \
                        from None
            time.sleep(BACKOFF * 2 ** attempt)
        raise AssertionError("unreachable")

    def _answer(self, challenge: str, url: str) -> str:
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise RegistryError(f"GET {url}: the registry {self.host} wants a user name "
                                    f"and password (`minictr login {self.host}`)")
            return self.credentials.basic()
        if scheme.lower() != "bearer":
            raise RegistryError(f"GET {url}: unknown auth challenge {scheme!r}")
        return "Bearer " + self._token(dict(re.findall(r'(\w+)="([^"]*)"', rest)), url)

    def _token(self, params: dict[str, str], url: str) -> str:
        realm = params.pop("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise RegistryError(f"GET {url}: the auth challenge names no token realm")
        if parts.scheme == "http" and not is_insecure_allowed(parts.netloc):
            # our credentials would cross the network in clear text
            raise RegistryError(f"GET {url}: refused the plain-HTTP token realm {realm} "
                                "(only loopback and MINICTR_INSECURE_REGISTRIES may be)")
        request = urllib.request.Request(realm + "?" + urllib.parse.urlencode(params))
        if self.credentials is not None:
            request.add_unredirected_header("Authorization", self.credentials.basic())
        try:
            with self.opener.open(request, timeout=TIMEOUT) as response:
                body = response.read(MAX_TOKEN + 1)
        except urllib.error.HTTPError as error:
            who = "these credentials" if self.credentials else "an anonymous pull"
            raise RegistryError(f"the token service of {self.host} refused {who} "
                                f"({error.code}): `minictr login {self.host}`?") from None
        except (urllib.error.URLError, OSError) as error:
            raise RegistryError(f"the token service of {self.host}: "
                                f"{getattr(error, 'reason', error)}") from None
        try:
            document = json.loads(body[:MAX_TOKEN])
            return str(document.get("token") or document["access_token"])
        except (ValueError, KeyError, AttributeError):
            raise RegistryError(f"the token service of {self.host} answered no token") \
                from None

    def _refusal(self, error: urllib.error.HTTPError, url: str) -> RegistryError:
        error.close()
        if error.code == 401:
            who = "these credentials" if self.credentials else "an anonymous pull"
            return RegistryError(f"GET {url}: {self.host} refused {who} (401); "
                                 f"`minictr login {self.host}`?")
        if error.code == 404:
            return RegistryError(f"GET {url}: not found (404): no such image, tag or blob")
        return RegistryError(f"GET {url}: {error.code} {error.reason}")
