"""What a pull costs: a ~30 MB image of four layers from a registry on loopback (Debian's
docker-registry), pulled and unpacked into a fresh store by `pull()`, against what a
daemonless user does today in the same run: `skopeo copy` to an OCI layout, then
`umoci raw unpack` (tar -x of each layer where umoci is missing). Then a second image that
shares three of the four layers: the bytes it downloads are counted. Target: at or under
1.0x the peer.

    python tests/benchmarks/bench_images.py [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pytest_minictr.images.pull import pull
from pytest_minictr.images.store import Store
from tests.oci_registry import Registry, image_manifest, write_layout
from tests.test_images import layer, member

LAYER_MB = 7.5


def make_layer(seed: int, megabytes: float = LAYER_MB) -> bytes:
    """Files of which half are random (binaries, already compressed data) and half text:
    gzip shrinks it about as much as a distribution's userland."""
    rng = random.Random(seed)
    members, left, index = [], int(megabytes * 2**20), 0
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(400)]
    while left > 0:
        size = min(left, rng.randint(4 << 10, 512 << 10))
        data = rng.randbytes(size) if index % 2 else b" ".join(
            rng.choices(words, k=size // 5))[:size]
        members.append(member(f"layer{seed}/file{index}", data))
        left -= size
        index += 1
    return layer(*members)


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def peer_pull(registry: Registry, reference: str, place: Path) -> None:
    """skopeo copy to an OCI layout, then unpack it as umoci does (or tar, without umoci)."""
    layout = place / "layout"
    place.mkdir()
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                    f"docker://{reference}", f"oci:{layout}:latest"], check=True,
                   capture_output=True)
    if shutil.which("umoci"):
        subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:latest",
                        str(place / "rootfs")], check=True, capture_output=True)
        return
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_text())
    (place / "rootfs").mkdir()
    for descriptor in manifest["layers"]:
        with tarfile.open(_blob(layout, descriptor["digest"])) as tar:
            tar.extractall(place / "rootfs")


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        place = Path(tmp)
        registry = Registry(place / "registry")
        try:
            figures = measure(registry, place, options.rounds)
        finally:
            registry.stop()
    if options.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:32} {value}")
    return 0


def measure(registry: Registry, place: Path, rounds: int) -> dict[str, object]:
    layers = [make_layer(seed) for seed in range(4)]
    base = registry.push(write_layout(place / "base", image_manifest(place / "base", layers)),
                         "bench/base")
    other = registry.push(write_layout(place / "other", image_manifest(
        place / "other", [*layers[:3], make_layer(99)])), "bench/other")
    ours, peers = [], []
    for _ in range(rounds):
        ours.append(timed(lambda: pull(base, store=Store(place / "store"))))
        peers.append(timed(lambda: peer_pull(registry, base, place / "peer")))
        shutil.rmtree(place / "store")
        shutil.rmtree(place / "peer")
    store = Store(place / "shared")
    fetched: dict[str, int] = {}
    pull(base, store=store, progress=lambda digest, seen, size: fetched.update({digest: seen}))
    first_bytes = sum(fetched.values())
    fetched.clear()
    pull(other, store=store, progress=lambda digest, seen, size: fetched.update({digest: seen}))
    size = sum(len(data) for data in layers)
    return {"image_unpacked_mb": round(size / 2**20, 1),
            "layers": len(layers),
            "pull_best_s": round(min(ours), 3),
            "peer_best_s": round(min(peers), 3),
            "peer": "skopeo copy + " + ("umoci raw unpack" if shutil.which("umoci") else "tar"),
            "ratio": round(min(ours) / min(peers), 2),
            "first_image_downloaded_bytes": first_bytes,
            "second_image_downloaded_bytes": sum(fetched.values()),
            "second_image_layers_downloaded": f"{len(fetched)} of 4",
            "cpus": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
