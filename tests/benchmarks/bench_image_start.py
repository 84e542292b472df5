"""Start latency from an image against a host-binary rootfs of the same files (issue #29:
within 1.1x).

The rootfs is the one the suite builds from this host's binaries; the image holds the same
files split over N layer directories (file by file, round robin), stacked by overlay as the
store's layers are. Each variant runs `echo hi` and waits for its output, one runtime
reused, interleaved round-robin after a warm-up, with the default user namespace (each
layer is then idmapped on its own) and with user=False.

    python tests/benchmarks/bench_image_start.py [--runs 200] [--layers 2 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from pytest_minictr import ContainerRuntime, RootfsBuilder
from pytest_minictr.images.image import Image, ImageConfig
from tests.conftest import BINARIES


def split_into_layers(rootfs: Path, place: Path, count: int) -> tuple[Path, ...]:
    """The files of `rootfs` dealt to `count` layers in turn (each layer has every directory)."""
    layers = tuple(place / f"layer{index}" for index in range(count))
    dealt = 0
    for directory, subdirs, files in os.walk(rootfs):
        relative = Path(directory).relative_to(rootfs)
        for layer in layers:
            (layer / relative).mkdir(parents=True, exist_ok=True)
            shutil.copystat(directory, layer / relative)
        for name in sorted(files) + [d for d in subdirs if os.path.islink(Path(directory, d))]:
            source = Path(directory, name)
            target = layers[dealt % count] / relative / name
            dealt += 1
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)
        subdirs[:] = [d for d in subdirs if not os.path.islink(Path(directory, d))]
    return layers


def measure(runtime: ContainerRuntime, variants: dict, runs: int, warmup: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(warmup + runs):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            root, keywords = variants[name]
            began = time.perf_counter()
            result = runtime.run(root, ["echo", "hi"], **keywords).wait()
            spent = time.perf_counter() - began
            assert result.stdout == b"hi\n", (name, result.stderr)
            if round_ >= warmup:
                times[name].append(spent)
    return {name: {"median_ms": statistics.median(values) * 1e3,
                   "p95_ms": sorted(values)[int(len(values) * 0.95)] * 1e3,
                   "min_ms": min(values) * 1e3} for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    place = Path(tempfile.mkdtemp(prefix="minictr-bench-image-"))
    try:
        rootfs = RootfsBuilder(cache_dir=place / "cache").build(binaries=BINARIES)
        images = {count: Image(f"bench/{count}", "sha256:" + "0" * 64,
                               split_into_layers(rootfs, place / f"image{count}", count),
                               ImageConfig()) for count in args.layers}
        variants: dict = {}
        for user in (True, False):
            suffix = "" if user else " user=False"
            variants["rootfs" + suffix] = (rootfs, {"user": user})
            for count, image in images.items():
                variants[f"image of {count} layers{suffix}"] = (image, {"user": user})
        with ContainerRuntime() as runtime:
            figures = measure(runtime, variants, args.runs, args.warmup)
    finally:
        shutil.rmtree(place, ignore_errors=True)
    for name, figure in figures.items():
        base = figures["rootfs" + (" user=False" if name.endswith("user=False") else "")]
        figure["ratio"] = figure["median_ms"] / base["median_ms"]
    if args.json:
        print(json.dumps(figures))
    else:
        for name, figure in figures.items():
            print(f"{name:28} median {figure['median_ms']:6.2f} ms  p95 {figure['p95_ms']:6.2f}"
                  f" ms  min {figure['min_ms']:6.2f} ms  x{figure['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
