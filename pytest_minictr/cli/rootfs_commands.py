"""`minictr rootfs build | import | list | prune`: the subcommands and their handlers, each a
thin layer over `rootfs.builder`, `rootfs.images` and `rootfs.cache` (which take plain
arguments and print nothing)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from pytest_minictr.cli.text import print_table, size_text
from pytest_minictr.errors import ConfigError
from pytest_minictr.rootfs import cache
from pytest_minictr.rootfs.builder import RootfsBuilder
from pytest_minictr.rootfs.images import import_image
from pytest_minictr.sizes import parse_size


def add_commands(commands: argparse._SubParsersAction[Any], help_recipe: str) -> None:
    rootfs = commands.add_parser("rootfs", help="build root filesystems")
    subcommands = rootfs.add_subparsers(dest="rootfs_command", required=True, metavar="COMMAND")
    build = subcommands.add_parser("build", help="build a rootfs into a directory")
    build.add_argument("--recipe", metavar="NAME", help=help_recipe)
    build.add_argument("--bin", action="append", default=[], metavar="NAME",
                       help="host binary to copy with its libraries; repeatable")
    build.add_argument("dest", help="directory to create (must not exist or be empty)")
    build.set_defaults(handler=build_rootfs)
    listing = subcommands.add_parser("list", help="the rootfs cache: key, recipe, size, age")
    listing.add_argument("--json", action="store_true", help="one JSON array of the entries")
    listing.set_defaults(handler=list_cache)
    prune = subcommands.add_parser("prune", help="empty the rootfs cache")
    prune.set_defaults(handler=prune_cache)
    importing = subcommands.add_parser(
        "import", help="unpack a `docker save` or OCI image tarball into a directory")
    importing.add_argument("image", help="the image tarball")
    importing.add_argument("dest", help="directory to create (must not exist or be empty)")
    importing.add_argument("--max-size", default="16G", metavar="SIZE",
                           help="refuse an image bigger than this unpacked (default 16G)")
    importing.set_defaults(handler=import_command)


def build_rootfs(args: argparse.Namespace) -> int:
    if not args.bin and not args.recipe:
        raise ConfigError("minictr rootfs build: give --recipe NAME and/or --bin NAME")
    print(RootfsBuilder().build(binaries=args.bin, dest=args.dest, recipe=args.recipe))
    return 0


def import_command(args: argparse.Namespace) -> int:
    print(import_image(args.image, args.dest, parse_size(args.max_size, "--max-size")))
    return 0


def list_cache(args: argparse.Namespace) -> int:
    entries = cache.cache_entries()
    if args.json:
        print(json.dumps([dataclasses.asdict(entry) for entry in entries]))
        return 0
    rows = [("KEY", "RECIPE", "SIZE", "SHARED", "AGE", "BINARIES")] + [
        (entry.key, entry.recipe or "-", size_text(entry.size), size_text(entry.shared),
         f"{entry.age / 3600:.1f}h", " ".join(os.path.basename(b) for b in entry.binaries))
        for entry in entries]
    print_table(rows, numbers=(2, 3, 4))
    return 0


def prune_cache(args: argparse.Namespace) -> int:
    removed = cache.prune()
    print(f"removed {removed} entries from {cache.default_cache_dir()}")
    return 0
