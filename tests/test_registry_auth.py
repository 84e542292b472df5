"""Registry auth and HTTP edges: bearer tokens, basic auth against a real htpasswd registry,
credentials from Docker's and podman's files and `minictr login`, redirects to blob storage
(followed without our Authorization; a loop refused), a huge manifest, a flaky server."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import stat
import threading

import pytest

from pytest_minictr.images import auth
from pytest_minictr.images.pull import pull
from pytest_minictr.images.reference import parse_reference
from pytest_minictr.images.registry import RegistryClient
from pytest_minictr.images.store import Store
from pytest_minictr.images.transport import RegistryError
from tests.oci_registry import Registry, layout_of
from tests.test_images import layer, member

SECRET = "s3cret-Pa55"
BLOB = b'{"config": {"Cmd": ["x"]}}'
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
LAYER = gzip.compress(layer(member("f", b"whole")))
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
CUT_MANIFEST = json.dumps({"schemaVersion": 2,
                           "config": {"digest": BLOB_DIGEST, "size": len(BLOB)},
                           "layers": [{"digest": LAYER_DIGEST, "size": len(LAYER)}]}).encode()
MANIFEST = json.dumps({"schemaVersion": 2, "config": {"digest": BLOB_DIGEST, "size": len(BLOB)},
                       "layers": []}).encode()


class FakeRegistry(http.server.ThreadingHTTPServer):
    """Answers as a registry behind a token service would, with a few bad habits."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Fake)
        self.seen: list[tuple[str, str]] = []  # (path, Authorization header)
        self.failures = {"/v2/flaky/manifests/latest": 1}
        self.cuts = 2  # the layer's first two downloads break in the middle
        self.host = f"127.0.0.1:{self.server_port}"


class _Fake(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        authorization = self.headers.get("Authorization", "")
        server.seen.append((self.path, authorization))
        if server.failures.get(self.path, 0) > 0:
            server.failures[self.path] -= 1
            return self._answer(503, b"busy")
        if self.path.startswith("/token"):
            return self._answer(200, json.dumps({"token": "good"}).encode())
        if self.path.startswith("/storage/loop"):
            return self._answer(302, b"", {"Location": self.path})
        if self.path.startswith("/storage/"):
            return self._answer(200, BLOB)
        if authorization != "Bearer good":
            challenge = (f'Bearer realm="http://{server.host}/token",service="fake",'
                         'scope="repository:x:pull"')
            return self._answer(401, b"", {"WWW-Authenticate": challenge})
        if self.path == f"/v2/cut/blobs/{LAYER_DIGEST}":
            return self._cut() if server.cuts > 0 else self._answer(200, LAYER)
        if self.path.startswith("/v2/cut/manifests/"):
            return self._answer(200, CUT_MANIFEST)
        if self.path.startswith("/v2/huge/manifests/"):
            return self._answer(200, b" " * (5 << 20))
        if self.path.startswith("/v2/loop/blobs/"):
            return self._answer(307, b"", {"Location": "/storage/loop"})
        if "/blobs/" in self.path:
            return self._answer(307, b"", {"Location": f"/storage/{BLOB_DIGEST}"})
        return self._answer(200, MANIFEST, {"Content-Type": "application/vnd.oci.image."
                                                            "manifest.v1+json"})

    def _cut(self) -> None:
        self.server.cuts -= 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(LAYER)))
        self.end_headers()
        self.wfile.write(LAYER[:len(LAYER) // 2])
        self.close_connection = True

    def _answer(self, code: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake():
    server = FakeRegistry()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def client(fake: FakeRegistry, repository: str) -> RegistryClient:
    return RegistryClient(parse_reference(f"{fake.host}/{repository}"))


def test_an_anonymous_bearer_token_is_fetched_and_not_sent_to_blob_storage(fake):
    registry = client(fake, "x")
    manifest = registry.manifest("linux/amd64")
    _, config = registry.config(manifest.config)
    assert config == {"config": {"Cmd": ["x"]}}
    authorizations = dict(fake.seen)
    assert authorizations["/v2/x/manifests/latest"] == "Bearer good"
    assert authorizations[f"/storage/{BLOB_DIGEST}"] == ""  # the redirect did not carry it


def test_a_redirect_loop_is_refused(fake):
    registry = client(fake, "loop")
    with pytest.raises(RegistryError, match="redirect loop"):
        registry.config(registry.manifest("linux/amd64").config)


def test_a_huge_manifest_is_refused(fake):
    with pytest.raises(RegistryError, match="manifest refused, more than 4194304 bytes"):
        client(fake, "huge").manifest("linux/amd64")


def test_a_transient_failure_is_retried(fake):
    assert client(fake, "flaky").manifest("linux/amd64").config.digest == BLOB_DIGEST


def test_a_download_broken_in_the_middle_is_tried_again(fake, tmp_path):
    image = pull(f"{fake.host}/cut", store=Store(tmp_path / "store"))
    assert (image.layers[0] / "f").read_text() == "whole" and fake.cuts == 0


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    place = tmp_path_factory.mktemp("private")
    server = Registry(place / "server", user="tester", password=SECRET)
    server.image = server.push(layout_of(place / "one", [layer(member("f", b"private"))]),
                               "test/private")
    yield server
    server.stop()


def test_basic_auth_needs_credentials_and_never_shows_them(private, tmp_path):
    with pytest.raises(RegistryError, match="wants a user name and password") as refused:
        pull(private.image, store=Store(tmp_path / "s"))
    assert "minictr login" in str(refused.value)
    auth.login(private.host, auth.Credentials("tester", "wrong"))
    with pytest.raises(RegistryError, match="refused these credentials") as wrong:
        pull(private.image, store=Store(tmp_path / "s"))
    assert "wrong" not in str(wrong.value) and "wrong" not in repr(auth.credentials_for(
        private.host))


def test_credentials_from_login_docker_config_and_podman_file(private, tmp_path, monkeypatch):
    path = auth.login(private.host, auth.Credentials("tester", SECRET))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pull(private.image, store=Store(tmp_path / "a")).layers
    assert auth.logout(private.host) and not auth.logout(private.host)
    docker = tmp_path / "docker" / "config.json"
    docker.parent.mkdir()
    token = base64.b64encode(f"tester:{SECRET}".encode()).decode()
    docker.write_text(json.dumps({"auths": {f"http://{private.host}": {"auth": token}}}))
    assert pull(private.image, store=Store(tmp_path / "b")).layers
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "elsewhere"))
    (tmp_path / "auth.json").write_text(json.dumps(
        {"auths": {private.host: {"auth": token}}}))  # podman's REGISTRY_AUTH_FILE
    assert pull(private.image, store=Store(tmp_path / "c")).layers


def test_a_plain_http_token_realm_elsewhere_is_refused(fake):
    transport = client(fake, "x").transport
    with pytest.raises(RegistryError, match="refused the plain-HTTP token realm"):
        transport._token({"realm": "http://tokens.example/token"}, "url")


def test_plain_http_only_to_loopback_and_listed_registries(monkeypatch):
    from pytest_minictr.images.transport import Transport
    assert Transport("127.0.0.1:5000").base == "http://127.0.0.1:5000"
    assert Transport("[::1]:5000").base == "http://[::1]:5000"
    assert Transport("registry.example:5000").base == "https://registry.example:5000"
    monkeypatch.setenv("MINICTR_INSECURE_REGISTRIES", "registry.example:5000, other")
    assert Transport("registry.example:5000").base == "http://registry.example:5000"
    assert Transport("other:1").base == "http://other:1"
