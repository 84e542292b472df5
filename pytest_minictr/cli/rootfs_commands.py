"""`minictr rootfs import | list | prune`: the argparse handlers, each a thin layer over
`rootfs.images` and `rootfs.cache` (which take plain arguments and print nothing)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from pytest_minictr.rootfs import cache
from pytest_minictr.rootfs.images import import_image
from pytest_minictr.spec import parse_size


def import_command(args: argparse.Namespace) -> int:
    print(import_image(args.image, args.dest, parse_size(args.max_size, "--max-size")))
    return 0


def list_cache(args: argparse.Namespace) -> int:
    entries = cache.cache_entries()
    if args.json:
        for entry in entries:
            print(json.dumps(dataclasses.asdict(entry)))
        return 0
    print(f"{'KEY':<34}{'RECIPE':<10}{'SIZE':>10}{'AGE':>9}  BINARIES")
    for entry in entries:
        print(f"{entry.key:<34}{entry.recipe or '-':<10}"
              f"{entry.size / 2**20:>8.1f}M{entry.age / 3600:>8.1f}h  "
              f"{' '.join(os.path.basename(b) for b in entry.binaries)}")
    return 0


def prune_cache(args: argparse.Namespace) -> int:
    removed = cache.prune()
    print(f"removed {removed} entries from {cache.default_cache_dir()}")
    return 0
