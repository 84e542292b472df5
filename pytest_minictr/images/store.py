"""The image store: content-addressed, each layer unpacked once and shared by every image
that has it, and what references name.

    <store>/index.json                 reference -> {digest, platform} (the images)
    <store>/images/sha256/<hex>.json   a manifest's digest -> its config and layer digests
    <store>/blobs/sha256/<hex>         config blobs, as pulled (digest-checked)
    <store>/layers/sha256/<hex>/tree   a layer, unpacked (a lower directory of an overlay)
    <store>/layers/sha256/<hex>/layer.json   its unpacked size; its presence = complete
    <store>/locks/                     flock files: one writer of the index, one per layer

Root's store is /var/lib/minictr/images (images are data kept, not a cache rebuilt from the
host); an ordinary account's is $XDG_DATA_HOME/minictr/images (~/.local/share/...);
$MINICTR_IMAGE_STORE overrides both. A layer is unpacked in a temporary directory and
published by one rename, under its lock: parallel pulls (pytest-xdist) of one image download
each layer once, the others wait for it and find it there. A published layer is never written
again; `rmi` and `prune` remove whole layers that no image names and no container holds
(a shared lock on each layer while it runs: `layer_holds`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_minictr import immutable
from pytest_minictr import layer_holds as holds
from pytest_minictr.errors import ConfigError
from pytest_minictr.images.image import Image, ImageConfig
from pytest_minictr.images.reference import Reference, parse_reference

ROOT_STORE = "/var/lib/minictr/images"


def default_store_dir() -> Path:
    if os.environ.get("MINICTR_IMAGE_STORE"):
        return Path(os.environ["MINICTR_IMAGE_STORE"]).absolute()
    if os.geteuid() == 0:
        return Path(ROOT_STORE)
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "minictr" / "images"


@dataclass(frozen=True)
class ImageRecord:
    """What the store keeps of one manifest: its config blob and layers, bottom first."""

    digest: str
    config: str
    layers: tuple[str, ...]
    platform: str


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_store_dir()

    # --- paths ---------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / _digest_path(digest)

    def layer_dir(self, digest: str) -> Path:
        return self.root / "layers" / _digest_path(digest)

    def layer_tree(self, digest: str) -> Path:
        return self.layer_dir(digest) / "tree"

    def has_layer(self, digest: str) -> bool:
        return (self.layer_dir(digest) / "layer.json").is_file()

    # --- writing -------------------------------------------------------------------------
    def put_blob(self, digest: str, data: bytes) -> None:
        path = self.blob_path(digest)
        if not path.exists():
            _write_atomically(path, data)

    def add_layer(self, digest: str, fill: Callable[[Path], None]) -> None:
        """Make the layer `digest` with `fill(tree)` unless it is there; one process does it,
        any other asking for it meanwhile waits and then finds it."""
        if self.has_layer(digest):
            return
        with self._locked(f"layer-{digest.partition(':')[2]}"):
            if self.has_layer(digest):
                return
            final = self.layer_dir(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(4)}"
            try:
                (tmp / "tree").mkdir(parents=True)
                fill(tmp / "tree")
                size = _tree_size(tmp / "tree")
                (tmp / "layer.json").write_text(json.dumps({"size": size}))
                os.chmod(tmp / "tree", 0o755)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def tag(self, reference: Reference, record: ImageRecord) -> None:
        """Name the image `record` by `reference` (its layers already in the store)."""
        _write_atomically(self.root / "images" / f"{_digest_path(record.digest)}.json",
                          json.dumps({"config": record.config, "layers": record.layers,
                                      "platform": record.platform}).encode())
        with self._locked("index"):
            index = self._index()
            index[str(reference)] = {"digest": record.digest, "platform": record.platform}
            self._write_index(index)

    # --- reading -------------------------------------------------------------------------
    def lookup(self, ref: str | Reference) -> Image | None:
        """The image `ref` names, if the store holds it whole; None otherwise."""
        reference = parse_reference(ref) if isinstance(ref, str) else ref
        index = self._index()
        key = str(reference)
        if key not in index and reference.digest:  # a digest names an image by any tag
            key = next((name for name, entry in index.items()
                        if entry["digest"] == reference.digest), key)
        if key not in index:
            return None
        record = self.record(index[key]["digest"])
        if record is None or not all(map(self.has_layer, record.layers)):
            return None
        return self._image(key, record)

    def record(self, digest: str) -> ImageRecord | None:
        try:
            document = json.loads((self.root / "images" / f"{_digest_path(digest)}.json")
                                  .read_text())
        except (FileNotFoundError, ValueError):
            return None
        return ImageRecord(digest, document["config"], tuple(document["layers"]),
                           document["platform"])

    def images(self) -> list[Image]:
        """Every image the store names, by reference."""
        found = []
        for reference in sorted(self._index()):
            image = self.lookup(parse_reference(reference))
            if image is not None:
                found.append(image)
        return found

    def config_document(self, record: ImageRecord) -> dict[str, Any]:
        try:
            document = json.loads(self.blob_path(record.config).read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return document if isinstance(document, dict) else {}

    def inspect(self, ref: str) -> dict[str, Any]:
        """`minictr image inspect`: what Docker's shows that a test reads."""
        image = self._need(ref)
        record = self.record(image.digest)
        assert record is not None
        config = self.config_document(record)
        return {"reference": image.reference, "digest": image.digest,
                "platform": image.platform, "created": config.get("created", ""),
                "config": config.get("config") or {}, "labels": dict(image.config.labels),
                "size": image.size,
                "layers": [{"digest": digest, "path": str(self.layer_tree(digest)),
                            "size": self._layer_size(digest)} for digest in record.layers]}

    # --- removing ------------------------------------------------------------------------
    def remove(self, ref: str) -> list[str]:
        """`rmi`: forget the reference, then the layers no image names any more."""
        image = self._need(ref)
        with self._locked("index"):
            index = self._index()
            del index[image.reference]
            self._write_index(index)
        return [image.reference, *self.prune()]

    def prune(self) -> list[str]:
        """Remove the layers, records and blobs no reference leads to (and what interrupted
        pulls left); the digests of the layers removed."""
        removed = []
        with self._locked("index"):
            records = [self.record(entry["digest"]) for entry in self._index().values()]
            kept = {digest for record in records if record for digest in
                    (record.digest, record.config, *record.layers)}
            for kind in ("layers", "images", "blobs"):
                for path in sorted((self.root / kind / "sha256").glob("*")):
                    # a pull's temporary '.tmp-<hex>-<random>' is left alone while its
                    # layer's lock is held: the lock is free once that pull is over
                    value = path.name.split("-")[1] if path.name.startswith(".tmp-") \
                        else path.name
                    digest = "sha256:" + value.removesuffix(".json")
                    if digest in kept and value == path.name:
                        continue
                    with self._locked(f"layer-{value.removesuffix('.json')}",
                                      wait=False) as free:
                        if free:  # else a container runs on it, or a pull makes it
                            _remove(path)
                            removed += [digest] if kind == "layers" and value == path.name \
                                else []
        return removed

    # --- inside --------------------------------------------------------------------------
    def _image(self, reference: str, record: ImageRecord) -> Image:
        return Image(reference=reference, digest=record.digest,
                     layers=tuple(self.layer_tree(digest) for digest in record.layers),
                     config=ImageConfig.from_oci(self.config_document(record)),
                     platform=record.platform,
                     size=sum(self._layer_size(digest) for digest in record.layers))

    def _need(self, ref: str) -> Image:
        image = self.lookup(ref)
        if image is None:
            raise ConfigError(f"no image {ref!r} in the store {self.root} (`minictr images` "
                              "lists them; `minictr pull` fetches one)")
        return image

    def _layer_size(self, digest: str) -> int:
        try:
            return int(json.loads((self.layer_dir(digest) / "layer.json").read_text())["size"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def _index(self) -> dict[str, Any]:
        try:
            document = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {}
        return dict(document.get("references") or {})

    def _write_index(self, index: dict[str, Any]) -> None:
        _write_atomically(self.root / "index.json",
                          json.dumps({"references": index}, indent=1).encode())

    @contextmanager
    def in_use(self, image: Image) -> Iterator[None]:
        """Hold the image's layers as a running container does (the launcher: `layer_holds`):
        `rmi` and `prune` leave a layer held for a later prune."""
        fds = holds.hold_layers(image.layers)
        try:
            yield
        finally:
            holds.let_go(fds)

    @contextmanager
    def _locked(self, name: str, wait: bool = True) -> Iterator[bool]:
        """flock on locks/NAME.lock; what it gives is whether it was had (wait=False)."""
        path = holds.lock_file(self.root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        immutable.mark(self.root)  # before its first layer: no container may bind it writable
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _digest_path(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    if not value or "/" in value or value.startswith("."):
        raise ConfigError(f"{digest!r} is not a digest")
    return f"{algorithm}/{value}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tree_size(tree: Path) -> int:
    total = 0
    for directory, _, files in os.walk(tree):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_size
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
