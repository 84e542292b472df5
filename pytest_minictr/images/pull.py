"""`pull(ref) -> Image`: a registry's image into the store, each layer downloaded and unpacked
in one pass (no compressed copy is kept), several at once, and only those the store lacks.

A layer's bytes are hashed as they stream through the decompressor into a temporary
directory; a digest that does not match (or a blob that does not unpack) removes that
directory, and the error names the digest. Layers are gzip, zstd or plain tar, told by their
first bytes rather than by the media type (registries mislabel them). zstd needs Python 3.14's
`compression.zstd` or the `zstandard` package (`pip install pytest-minictr[zstd]`).
"""

from __future__ import annotations

import gzip
import io
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from pytest_minictr.errors import MinictrError, RootfsError
from pytest_minictr.images.image import Image
from pytest_minictr.images.reference import Reference, parse_reference
from pytest_minictr.images.registry import (
    BlobInterruptedError,
    Descriptor,
    RegistryClient,
    check_runnable,
    host_platform_name,
    normalize_platform,
)
from pytest_minictr.images.store import ImageRecord, Store
from pytest_minictr.images.transport import ATTEMPTS, BACKOFF, RegistryError
from pytest_minictr.images.unpack import Budget, unpack_layer

MAX_UNPACKED = 64 << 30  # an image unpacking to more is refused as a decompression bomb
CONCURRENT_LAYERS = 4
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Progress = Callable[[str, int, int], None]  # (layer digest, bytes so far, its size)


def pull(ref: str | Reference, platform: str | None = None, store: Store | None = None,
         progress: Progress | None = None, max_size: int = MAX_UNPACKED) -> Image:
    """The image `ref` names, for this machine's platform (or `platform`, which must be one
    this machine runs), in `store` (the default one if None), fetched from its registry."""
    reference = parse_reference(ref) if isinstance(ref, str) else ref
    wanted = normalize_platform(platform) if platform else host_platform_name()
    check_runnable(wanted)
    store = Store() if store is None else store
    client = RegistryClient(reference)
    manifest = client.manifest(wanted)
    data, _ = client.config(manifest.config)
    store.put_blob(manifest.config.digest, data)
    budget = LockedBudget(max_size)
    # (an image may hold one layer twice: Docker's empty layer, say)
    missing = list({layer.digest: layer for layer in manifest.layers
                    if not store.has_layer(layer.digest)}.values())
    if missing:
        with ThreadPoolExecutor(min(CONCURRENT_LAYERS, len(missing))) as pool:
            futures = [pool.submit(_add_layer, store, client, layer, budget, progress)
                       for layer in missing]
            try:
                for done in futures:
                    done.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the layers not started are not fetched
                raise
    record = ImageRecord(manifest.digest, manifest.config.digest,
                         tuple(layer.digest for layer in manifest.layers), wanted)
    store.tag(reference, record)
    image = store.lookup(reference)
    if image is None:  # a prune ran between our layers and our tag
        raise RegistryError(f"{reference}: its layers were pruned while it was pulled; "
                            "pull again")
    return image


class LockedBudget(Budget):
    """One budget for the layers unpacked at once by several threads."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.lock = threading.Lock()

    def spend(self, size: int, name: str) -> None:
        with self.lock:
            super().spend(size, name)


def _add_layer(store: Store, client: RegistryClient, layer: Descriptor, budget: Budget,
               progress: Progress | None) -> None:
    """The layer into the store, its download tried again (from its start: a registry need
    not serve ranges) when the connection breaks in the middle."""
    for attempt in range(ATTEMPTS):
        try:
            store.add_layer(layer.digest, _filler(client, layer, budget, progress))
            return
        except BlobInterruptedError:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(BACKOFF * 2 ** attempt)


def _filler(client: RegistryClient, layer: Descriptor, budget: Budget,
            progress: Progress | None) -> Callable[[Path], None]:
    def fill(tree: Path) -> None:
        def seen(count: int) -> None:
            if progress is not None:
                progress(layer.digest, count, layer.size)
        with client.blob(layer, seen) as stream:
            try:
                unpack_layer(decompressed(stream), str(tree), budget,
                             keep_setuid=os.geteuid() == 0)
            except RootfsError as error:
                raise RootfsError(f"layer {layer.digest}: {error}") from None
            except MinictrError:
                raise
            except Exception as error:  # noqa: BLE001 - zlib, zstandard: errors of their own
                _drain(stream)  # a corrupt blob is told by its digest first
                raise RegistryError(f"layer {layer.digest}: cannot unpack it "
                                    f"({type(error).__name__}: {error})") from None
            _drain(stream)
    return fill


def decompressed(stream: io.BufferedReader) -> IO[bytes]:
    """The layer's tar stream, whatever it was compressed with."""
    magic = stream.peek(4)[:4]
    if magic.startswith(GZIP_MAGIC):
        unzipped: IO[bytes] = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
        return unzipped
    if magic == ZSTD_MAGIC:
        return zstd_reader(stream)
    return stream


def zstd_reader(stream: IO[bytes]) -> IO[bytes]:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # novermin (>= 3.14)
        reader: IO[bytes] = zstd.ZstdFile(stream)
        return reader
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise RegistryError("this image has zstd-compressed layers: install the extra "
                            "(`pip install 'pytest-minictr[zstd]'`, the zstandard package) "
                            "or use Python 3.14") from None
    decompressor: Any = zstandard.ZstdDecompressor()
    reader = decompressor.stream_reader(stream, read_across_frames=True)
    return reader  # type: ignore[no-any-return, unused-ignore]


def _drain(stream: IO[bytes]) -> None:
    """Read the blob to its end, where its digest is checked (tar stops at its end marker,
    before the compressor's trailer and padding)."""
    while stream.read(1 << 20):
        pass
