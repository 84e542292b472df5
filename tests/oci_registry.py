"""A real registry on loopback for the image tests and benchmarks: Debian's `docker-registry`
(the CNCF distribution server) with a throwaway storage directory, optionally behind htpasswd
auth, and images put there by `skopeo` from OCI layouts written here with tarfile."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

TOOLS = {"docker-registry": "docker-registry", "skopeo": "skopeo", "htpasswd": "apache2-utils"}


def need_tools(*names: str) -> None:
    missing = [f"{name} (Debian's {TOOLS[name]})" for name in names if not shutil.which(name)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: ci/install-deps installs them")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """`docker-registry serve` on 127.0.0.1:<free port>; `.host` is what references name."""

    def __init__(self, place: Path, user: str = "", password: str = ""):
        need_tools("docker-registry", "skopeo", *(["htpasswd"] if user else []))
        place.mkdir(parents=True, exist_ok=True)
        self.place, self.user, self.password = place, user, password
        self.host = f"127.0.0.1:{free_port()}"
        auth = ""
        if user:
            subprocess.run(["htpasswd", "-Bbc", str(place / "htpasswd"), user, password],
                           check=True, capture_output=True)
            auth = (f"auth:\n  htpasswd:\n    realm: test\n"
                    f"    path: {place / 'htpasswd'}\n")
        (place / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {place / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n{auth}")
        self.log = open(place / "log", "wb")
        self.process = subprocess.Popen(["docker-registry", "serve", str(place / "config.yml")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        port = int(self.host.rpartition(":")[2])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry ended: {(self.place / 'log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not listen within 20 s")

    def push(self, layout: Path, name: str, *options: str) -> str:
        """Copy the OCI layout's image (tag `latest` in it) to NAME here; its reference."""
        reference = f"{self.host}/{name}"
        credentials = [f"--dest-creds={self.user}:{self.password}"] if self.user else []
        subprocess.run(["skopeo", "copy", "-q", "--all", "--dest-tls-verify=false",
                        *credentials, *options, f"oci:{layout}:latest", f"docker://{reference}"],
                       check=True, capture_output=True, timeout=120)
        return reference

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


def blob(layout: Path, data: bytes) -> dict[str, object]:
    """Write `data` as a blob of the layout; its descriptor (mediaType left to the caller)."""
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def image_manifest(layout: Path, layers: list[bytes], config: dict | None = None,
                   architecture: str = "amd64") -> dict[str, object]:
    """An OCI manifest of the (uncompressed tar) `layers`, gzipped, bottom first; its
    descriptor with its platform."""
    diff_ids = [f"sha256:{hashlib.sha256(data).hexdigest()}" for data in layers]
    document = {"architecture": architecture, "os": "linux", "config": config or {},
                "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_blob = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **blob(layout, json.dumps(document).encode())}
    layer_blobs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    **blob(layout, gzip.compress(data, mtime=0))} for data in layers]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_blob, "layers": layer_blobs}
    return {"mediaType": manifest["mediaType"], **blob(layout, json.dumps(manifest).encode()),
            "platform": {"architecture": architecture, "os": "linux"}}


def write_layout(layout: Path, *manifests: dict[str, object]) -> Path:
    """index.json naming the manifest (or an index of the manifests) as tag `latest`."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    top = dict(manifests[0])
    if len(manifests) > 1:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": list(manifests)}
        top = {"mediaType": index["mediaType"], **blob(layout, json.dumps(index).encode())}
    top.pop("platform", None)
    top["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return layout


def layout_of(layout: Path, layers: list[bytes], config: dict | None = None) -> Path:
    return write_layout(layout, image_manifest(layout, layers, config))


def tree_files(root: Path) -> dict[str, str]:
    """relative path -> a short description, for comparing trees."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            found[str(path.relative_to(root))] = (
                "link:" + os.readlink(path) if path.is_symlink() else
                "dir" if path.is_dir() else
                "whiteout" if path.is_char_device() and os.lstat(path).st_rdev == 0 else
                path.read_bytes().decode(errors="replace"))
    return found


def layout_from_trees(layout: Path, root: Path, layers: list[list[str]]) -> Path:
    """An image of the directory `root`, one layer per list of its top-level entries
    (written by tar(1), which keeps owners, modes, links and setuid bits as an image
    builder does), gzipped fast."""
    layout.mkdir(parents=True, exist_ok=True)
    descriptors, diff_ids = [], []
    for index, entries in enumerate(layers):
        tar = subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", "-",
                              *entries], check=True, capture_output=True).stdout
        diff_ids.append(f"sha256:{hashlib.sha256(tar).hexdigest()}")
        descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            **blob(layout, gzip.compress(tar, compresslevel=1, mtime=0))})
        del tar, index
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(layout, json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {},
         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config, "layers": descriptors}
    return write_layout(layout, {"mediaType": manifest["mediaType"],
                                 **blob(layout, json.dumps(manifest).encode())})
