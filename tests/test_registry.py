"""Pulling from a real registry on loopback (Debian's docker-registry, images put there by
skopeo): layers kept once and stacked by a real overlay, indexes, zstd, digests, a corrupting
proxy, parallel pulls, and the store's list, rmi, prune and inspect."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

from pytest_minictr.errors import ConfigError
from pytest_minictr.images.pull import pull
from pytest_minictr.images.registry import DigestMismatchError
from pytest_minictr.images.store import Store
from pytest_minictr.images.transport import RegistryError
from tests.helpers import eventually
from tests.oci_registry import (
    Registry,
    image_manifest,
    layout_from_trees,
    layout_of,
    tree_files,
    write_layout,
)
from tests.test_images import layer, member
from tests.unprivileged import account_fixture, python_as, user_site

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux only")

BASE = layer(member("etc/", kind=tarfile.DIRTYPE, mode=0o755), member("etc/keep", b"lower\n"),
             member("etc/gone", b"x"), member("cache/", kind=tarfile.DIRTYPE, mode=0o755),
             member("cache/old", b"old"))
UPPER = layer(member("etc/keep", b"upper\n"), member("etc/.wh.gone"),
              member("cache/.wh..wh..opq"), member("cache/new", b"new"),
              member("bin/su", b"#!", mode=0o4755))
OTHER = layer(member("app/", kind=tarfile.DIRTYPE, mode=0o755), member("app/run", b"run"))
ZSTD = layer(member("app/", kind=tarfile.DIRTYPE, mode=0o755), member("app/z", b"zstd"))
EMPTY = layer()
CONFIG = {"Cmd": ["sh"], "Env": ["A=1"], "Labels": {"org.example": "yes"},
          "ExposedPorts": {"5432/tcp": {}}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    place = tmp_path_factory.mktemp("registry")
    server = Registry(place / "server")
    server.pushed = {
        "two": server.push(layout_of(place / "two", [BASE, UPPER], CONFIG), "test/two"),
        "shared": server.push(layout_of(place / "shared", [BASE, OTHER]), "test/shared"),
        "multi": server.push(write_layout(
            place / "multi", image_manifest(place / "multi", [BASE], architecture="amd64"),
            image_manifest(place / "multi", [OTHER], architecture="arm64")), "test/multi"),
        "twice": server.push(layout_of(place / "twice", [EMPTY, OTHER, EMPTY]), "test/twice"),
        # a layer of its own: skopeo would reuse a gzip blob the registry already has
        "zstd": server.push(layout_of(place / "zstd", [ZSTD]), "test/zstd",
                            "--dest-compress-format", "zstd"),
    }
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


@pytest.mark.needs_root  # (the overlay mount; an account's store keeps OCI's markers)
def test_layers_are_unpacked_apart_and_stack_by_overlay(registry, store, tmp_path):
    image = pull(registry.pushed["two"], store=store)
    assert image.reference == registry.pushed["two"] + ":latest"
    assert image.config.cmd == ("sh",) and image.config.labels == {"org.example": "yes"}
    assert image.config.exposed_ports == (5432,)
    lower, upper = image.layers
    assert tree_files(lower)["etc/gone"] == "x"  # a layer holds its own files only
    assert tree_files(upper)["etc/gone"] == "whiteout"
    assert os.getxattr(upper / "cache", "trusted.overlay.opaque") == b"y"
    assert (upper / "bin/su").stat().st_mode & 0o7777 == 0o4755  # root's store keeps setuid
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={upper}:{lower}", str(merged)], check=True)
    try:  # what the kernel makes of them is what the image spec says
        assert tree_files(merged) == {
            "etc": "dir", "etc/keep": "upper\n", "cache": "dir", "cache/new": "new",
            "bin": "dir", "bin/su": "#!"}
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_a_second_image_downloads_only_its_own_layers(registry, store):
    fetched: dict[str, int] = {}

    def count(digest: str, seen: int, size: int) -> None:
        fetched[digest] = seen
    first = pull(registry.pushed["two"], store=store, progress=count)
    assert len(fetched) == 2
    fetched.clear()
    second = pull(registry.pushed["shared"], store=store, progress=count)
    assert second.layers[0] == first.layers[0]  # the base, shared, unpacked once
    assert list(fetched) == [store.record(second.digest).layers[1]]


def test_a_layer_an_image_holds_twice_is_fetched_once(registry, store):
    fetched: list[str] = []
    image = pull(registry.pushed["twice"], store=store,
                 progress=lambda digest, seen, size: fetched.append(digest))
    assert image.layers[0] == image.layers[2] and len(set(fetched)) == 2
    assert len(os.listdir(store.root / "layers" / "sha256")) == 2


def test_an_index_gives_this_machines_image_and_refuses_a_foreign_one(registry, store):
    image = pull(registry.pushed["multi"], store=store)
    assert image.platform == "linux/amd64" and "etc/keep" in tree_files(image.layers[0])
    with pytest.raises(ConfigError, match="does not emulate"):
        pull(registry.pushed["multi"], platform="linux/arm64", store=store)
    with pytest.raises(ConfigError, match=r"no image for linux/amd64 \(it has: linux/arm64, "
                                          r"linux/s390x\)"):
        pull(_only_arm(registry), store=store)


def _only_arm(registry: Registry) -> str:
    place = registry.place.parent / "arm"
    if not place.exists():
        registry.push(write_layout(place, image_manifest(place, [OTHER], architecture="arm64"),
                                   image_manifest(place, [BASE], architecture="s390x")),
                      "test/arm")
    return f"{registry.host}/test/arm"


def test_a_loopback_registry_is_reached_past_a_proxy(registry, store, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.delenv("no_proxy", raising=False)
    assert pull(registry.pushed["two"], store=store).layers


def test_zstd_layers(registry, store):
    if sys.version_info < (3, 14):
        pytest.importorskip("zstandard", reason="zstd layers need the [zstd] extra (zstandard)")
    image = pull(registry.pushed["zstd"], store=store)
    assert tree_files(image.layers[0])["app/z"] == "zstd"


def test_zstd_without_a_decompressor_names_the_extra(registry, store, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression", None)
    with pytest.raises(RegistryError, match=r"zstd-compressed layers: install the extra"):
        pull(registry.pushed["zstd"], store=store)
    assert not list(store.root.glob("layers/sha256/*"))


def test_a_digest_reference_pulls_that_manifest(registry, store):
    digest = pull(registry.pushed["two"], store=store).digest
    again = pull(f"{registry.pushed['two']}@{digest}", store=Store(store.root.parent / "s2"))
    assert again.digest == digest
    by_digest = store.lookup(f"{registry.pushed['two']}@{digest}")
    assert by_digest is not None and by_digest.reference == registry.pushed["two"] + ":latest"
    assert store.remove(f"{registry.pushed['two']}@{digest}")[0] == by_digest.reference


class CorruptingProxy(http.server.ThreadingHTTPServer):
    """Forwards to the registry, flipping one byte in the middle of every blob."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        request = urllib.request.Request(f"http://{self.server.upstream}{self.path}",
                                         headers={"Accept": self.headers.get("Accept", "")})
        with urllib.request.urlopen(request) as response:
            body = bytearray(response.read())
            headers = response.headers
        if "/blobs/" in self.path and body:
            body[len(body) // 2] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Type", headers.get("Content-Type", ""))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_corrupted_blob_fails_cleanly_naming_its_digest(registry, store):
    proxy = CorruptingProxy(registry.host)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        name = registry.pushed["two"].replace(registry.host, f"127.0.0.1:{proxy.server_port}")
        with pytest.raises(DigestMismatchError, match=r"blob sha256:[0-9a-f]{64}"):
            pull(name, store=store)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert not list(store.root.glob("layers/sha256/*")) and store.images() == []


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_docker_hub_images_come_from_the_first_mirror_that_has_them(registry, store,
                                                                     monkeypatch, tmp_path):
    lacking = http.server.ThreadingHTTPServer(  # a mirror without the image: 404 for all
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=lacking.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MINICTR_REGISTRY_MIRRORS",
                           f"127.0.0.1:{lacking.server_port}, http://{registry.host}/")
        image = pull("test/two", store=store)
    finally:
        lacking.shutdown()
        lacking.server_close()
    assert image.reference == "docker.io/test/two:latest" and image.config.cmd == ("sh",)


def test_parallel_pulls_of_one_image_download_it_once(registry, store):
    script = ("import sys; from pytest_minictr.images.pull import pull;"
              "from pytest_minictr.images.store import Store;"
              "seen = set(); pull(sys.argv[1], store=Store(sys.argv[2]),"
              " progress=lambda d, n, s: seen.add(d)); print(len(seen))")
    pullers = [subprocess.Popen([sys.executable, "-c", script, registry.pushed["two"],
                                 str(store.root)], stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    downloads = [int(p.communicate(timeout=60)[0]) for p in pullers]
    assert sum(downloads) == 2 and all(p.returncode == 0 for p in pullers)
    assert len(store.images()) == 1


DEBIAN13 = Path(os.environ.get("MINICTR_DEBIAN13_CACHE", "/var/cache/minictr-ci/debian13"),
                "rootfs")


def listing(root: Path) -> dict[str, tuple]:
    """path -> (type and mode, owner, group, size or link target, links) of what an image
    may hold (device nodes and sockets are left out of images' layers)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                found[os.path.relpath(path, root)] = (
                    st.st_mode, st.st_uid, st.st_gid,
                    os.readlink(path) if stat.S_ISLNK(st.st_mode) else
                    st.st_size if stat.S_ISREG(st.st_mode) else 0,
                    st.st_nlink if stat.S_ISREG(st.st_mode) else 0)
    return found


def interesting_in(root: Path, directory: str) -> list[str]:
    """The setuid, setgid and hard-linked files of root/directory: what an unpacker gets wrong."""
    return sorted(os.path.join(directory, name) for name in os.listdir(root / directory)
                  if (root / directory / name).is_file() and not (root / directory / name)
                  .is_symlink() and (os.lstat(root / directory / name).st_mode & 0o6000
                                     or os.lstat(root / directory / name).st_nlink > 1))


@pytest.mark.needs_root  # (owners, setuid bits)
def test_a_debian_userland_round_trips(registry, store, tmp_path):
    if not (DEBIAN13 / ".minictr-complete").exists():
        pytest.skip(f"needs the Debian 13 userland `ci/debian13` builds with mmdebstrap "
                    f"(none in {DEBIAN13})")
    # /etc, /var and the merged-/usr links, then /usr/sbin and /usr/bin's setuid and
    # hard-linked files (all of /usr would be 400 MB: seconds, not a minute)
    top = sorted(set(os.listdir(DEBIAN13)) - {"usr", "opt", "dev"})  # (opt: the suite's venv)
    lower = ["usr/sbin", *interesting_in(DEBIAN13, "usr/bin")]
    name = registry.push(layout_from_trees(tmp_path / "debian", DEBIAN13, [top, lower]),
                         "test/debian")
    shutil.rmtree(tmp_path / "debian")
    rest, usr = pull(name, store=store).layers
    source = listing(DEBIAN13)
    for tree, entries in ((rest, top), (usr, lower)):
        assert listing(tree) == {path: entry for path, entry in source.items()
                                 if any(path == e or path.startswith(e + "/") for e in entries)
                                 or any(e.startswith(path + "/") for e in entries)}


def test_images_inspect_rmi_and_prune(registry, store):
    two = pull(registry.pushed["two"], store=store)
    shared = pull(registry.pushed["shared"], store=store)
    assert [image.reference for image in store.images()] == sorted(
        [two.reference, shared.reference])
    details = store.inspect(registry.pushed["two"])
    assert details["digest"] == two.digest and details["labels"] == {"org.example": "yes"}
    assert [layer["path"] for layer in details["layers"]] == [str(p) for p in two.layers]
    assert json.dumps(details)
    removed = store.remove(registry.pushed["two"])
    assert removed[0] == two.reference and len(removed) == 2  # its upper layer, not the base
    assert two.layers[0].is_dir() and not two.layers[1].exists()
    assert store.lookup(registry.pushed["two"]) is None
    (store.root / "layers" / "sha256" / ".tmp-dead-1234").mkdir()  # an interrupted pull's
    assert store.prune() == []
    assert sorted(os.listdir(store.root / "layers" / "sha256")) == [
        p.parent.name for p in shared.layers]
    with pytest.raises(ConfigError, match="no image"):
        store.remove(registry.pushed["two"])
    with store.in_use(shared):  # a container runs on it: its layers stay until it ends
        assert store.remove(registry.pushed["shared"]) == [shared.reference]
        assert all(path.is_dir() for path in shared.layers)
    assert len(store.prune()) == 2 and not any(path.exists() for path in shared.layers)


def test_a_missing_image_says_so(registry, store):
    with pytest.raises(RegistryError, match=r"test/absent/manifests/1: not found \(404\)"):
        pull(f"{registry.host}/test/absent:1", store=store)
    assert store.images() == []


account = account_fixture("mctrimg")
ROOTLESS_PULL = """
import json, os, stat, sys
from pytest_minictr.images.pull import pull
image = pull(sys.argv[1])
lower, upper = image.layers
gone = os.lstat(upper / "etc" / "gone") if os.path.lexists(upper / "etc" / "gone") else None
print(json.dumps({"store": str(lower.parents[3]), "owner": os.stat(upper / "bin/su").st_uid,
                  "mode": stat.S_IMODE(os.stat(upper / "bin/su").st_mode),
                  "whiteout": "device" if gone and stat.S_ISCHR(gone.st_mode) else
                              "marker" if (upper / "etc" / ".wh.gone").exists() else "none"}))
"""


def test_an_ordinary_account_pulls_into_its_own_store(registry, account):
    place = Path(tempfile.mkdtemp(prefix="minictr-images-"))  # (pytest's tmp is root's only)
    try:
        os.chmod(place, 0o755)
        home = place / "home"
        home.mkdir()
        os.chown(home, account.uid, account.gid)
        run = python_as(account.uid, account.gid, home, user_site(place))
        done = run("-c", ROOTLESS_PULL, registry.pushed["two"])
    finally:
        shutil.rmtree(place)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["store"] == str(home / ".local/share/minictr/images")
    assert found["owner"] == account.uid and found["mode"] == 0o755  # setuid dropped
    assert found["whiteout"] in ("device", "marker")


@pytest.fixture(scope="module")
def busybox_image(registry, tmp_path_factory):
    """A one-program image (busybox, static) with a second layer that deletes a file."""
    if not os.path.exists("/bin/busybox"):
        pytest.skip("needs /bin/busybox (Debian's busybox-static)")
    with open("/bin/busybox", "rb") as f:
        program = f.read()
    base = layer(member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
                 member("bin/busybox", program, mode=0o755),
                 member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
                 member("etc/motd", b"from the base\n"), member("etc/gone", b"x"))
    top = layer(member("etc/.wh.gone"), member("srv/", kind=tarfile.DIRTYPE, mode=0o755),
                member("srv/note", b"from the top\n"))
    config = {"Entrypoint": ["/bin/busybox"], "Cmd": ["echo", "default"],
              "Env": ["FROM_IMAGE=yes"], "WorkingDir": "/srv"}
    place = tmp_path_factory.mktemp("busybox")
    return registry.push(layout_of(place / "layout", [base, top], config), "test/busybox")


@pytest.mark.needs_root  # (overlay of the store's layers; an account's store: test_image_rootless)
def test_a_reference_runs_pulled_from_the_registry(busybox_image, runtime, tmp_path,
                                                   monkeypatch):
    monkeypatch.setenv("MINICTR_IMAGE_STORE", str(tmp_path / "store"))
    script = "cat /etc/motd note; test -e /etc/gone || echo gone; echo $FROM_IMAGE; pwd"
    result = runtime.run(busybox_image, ["sh", "-c", script]).wait()
    assert (result.returncode, result.stdout.decode()) == (
        0, "from the base\nfrom the top\ngone\nyes\n/srv\n"), result.stderr
    assert runtime.run(busybox_image).wait().stdout == b"default\n"  # Entrypoint + Cmd
    layers = Store(tmp_path / "store").lookup(busybox_image).layers
    assert all(not (tree / "srv" / "x").exists() for tree in layers)
    runtime.run(busybox_image, ["touch", "/srv/x"], pull="never").wait().check_returncode()
    assert all(not (tree / "srv" / "x").exists() for tree in layers)  # the layers stay as made


@pytest.mark.needs_root
def test_rmi_leaves_the_layers_of_a_running_container_until_it_ends(busybox_image, runtime,
                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("MINICTR_IMAGE_STORE", str(tmp_path / "store"))
    store = Store(tmp_path / "store")
    running = runtime.run(busybox_image, ["sh", "-c", "read line; cat /srv/note"],
                          input=b"go\n", timeout=30)
    image = store.lookup(busybox_image)
    layers = image.layers
    # the launcher held the layers before it answered run(): rmi forgets the image at once
    assert store.remove(busybox_image) == [image.reference]
    assert all(tree.is_dir() for tree in layers) and store.prune() == []
    result = running.wait()
    assert (result.returncode, result.stdout) == (0, b"from the top\n"), result.stderr
    # the end is told before the init's own exit: the layers go once it is reaped
    removed: list[str] = []
    assert eventually(lambda: bool(removed.extend(store.prune())) or len(removed) == 2)
    assert sorted(removed) == sorted(f"sha256:{tree.parent.name}" for tree in layers)
    assert not any(tree.exists() for tree in layers)


@pytest.mark.needs_root
def test_a_layer_pruned_before_the_start_is_a_clear_error(busybox_image, runtime, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("MINICTR_IMAGE_STORE", str(tmp_path / "store"))
    store = Store(tmp_path / "store")
    image = pull(busybox_image, store=store)
    store.remove(busybox_image)  # looked up, then removed: as a prune between the two
    with pytest.raises(ConfigError, match=r"was removed \(by `minictr rmi` or `prune`\)"):
        runtime.run(image, ["true"])


@pytest.mark.needs_root
def test_minictr_run_pulls_and_runs_an_image(busybox_image, tmp_path):
    env = {**os.environ, "MINICTR_IMAGE_STORE": str(tmp_path / "store")}
    done = subprocess.run([sys.executable, "-m", "pytest_minictr", "run", "--rm",
                           busybox_image, "cat", "/srv/note"],
                          env=env, capture_output=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, b"from the top\n"), done.stderr
    never = subprocess.run([sys.executable, "-m", "pytest_minictr", "run", "--pull", "never",
                            busybox_image + "-absent"], env=env, capture_output=True,
                           timeout=60)
    assert never.returncode == 125 and b"not in the store" in never.stderr
