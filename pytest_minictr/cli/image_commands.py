"""`minictr pull | images | rmi | image prune | image inspect | login | logout`: thin handlers
over `images.pull`, `images.store` and `images.auth` (which print nothing). A password is
read from stdin (`--password-stdin`) or a prompt that does not echo, never from the command
line, and never printed."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import threading
from typing import Any

from pytest_minictr.cli.text import print_table, size_text
from pytest_minictr.errors import ConfigError
from pytest_minictr.images import auth
from pytest_minictr.images.pull import pull
from pytest_minictr.images.reference import DOCKER_HUB, HOST_RE, HUB_ALIASES
from pytest_minictr.images.store import Store
from pytest_minictr.images.transport import Transport

HELP_PLATFORM = ("os/architecture[/variant] to pull from a multi-platform image (default: "
                 "this machine's; another architecture is an error: minictr does not emulate)")


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    puller = commands.add_parser("pull", help="fetch an image from its registry into the store")
    puller.add_argument("reference", metavar="REF",
                        help="alpine, alpine:3.20, ghcr.io/o/x@sha256:...")
    puller.add_argument("--platform", metavar="P", help=HELP_PLATFORM)
    puller.add_argument("--quiet", "-q", action="store_true", help="print the digest only")
    puller.set_defaults(handler=pull_command)
    listing = commands.add_parser("images", help="the images in the store")
    listing.add_argument("--json", action="store_true", help="one JSON array of the images")
    listing.set_defaults(handler=images_command)
    remove = commands.add_parser("rmi", help="remove an image (and the layers only it used)")
    remove.add_argument("reference", metavar="REF")
    remove.set_defaults(handler=rmi_command)
    image = commands.add_parser("image", help="image upkeep: prune, inspect")
    subcommands = image.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    subcommands.add_parser("prune", help="remove the layers no image uses").set_defaults(
        handler=prune_command)
    inspect = subcommands.add_parser("inspect", help="an image's config, labels and layers")
    inspect.add_argument("reference", metavar="REF")
    inspect.set_defaults(handler=inspect_command)
    login = commands.add_parser("login", help="keep credentials for a registry (file 0600)")
    login.add_argument("registry", nargs="?", default=DOCKER_HUB, metavar="REGISTRY")
    login.add_argument("--username", "-u", required=True, metavar="USER")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from stdin (else a prompt that does not echo)")
    login.set_defaults(handler=login_command)
    logout = commands.add_parser("logout", help="forget the credentials kept for a registry")
    logout.add_argument("registry", nargs="?", default=DOCKER_HUB, metavar="REGISTRY")
    logout.set_defaults(handler=logout_command)


def pull_command(args: argparse.Namespace) -> int:
    bar = ProgressBar(args.reference) if sys.stderr.isatty() and not args.quiet else None
    try:
        image = pull(args.reference, platform=args.platform,
                     progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(image.digest if args.quiet else f"{image.reference}: {image.digest} "
          f"({image.platform}, {len(image.layers)} layers, {size_text(image.size)})")
    return 0


class ProgressBar:
    """One line on stderr, redrawn as layers arrive: bytes of all of them, and a bar."""

    WIDTH = 30

    def __init__(self, reference: str):
        self.reference = reference
        self.layers: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()  # layers arrive on several threads

    def update(self, digest: str, seen: int, size: int) -> None:
        with self.lock:
            self.layers[digest] = (seen, size)
            done = sum(seen for seen, _ in self.layers.values())
            total = sum(size for _, size in self.layers.values()) or 1
            filled = self.WIDTH * done // total
            sys.stderr.write(f"\r{self.reference} [{'#' * filled}{'.' * (self.WIDTH - filled)}]"
                             f" {size_text(done)}/{size_text(total)}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.layers:
            sys.stderr.write("\n")


def images_command(args: argparse.Namespace) -> int:
    images = Store().images()
    if args.json:
        print(json.dumps([{"reference": image.reference, "digest": image.digest,
                           "platform": image.platform, "size": image.size,
                           "layers": [str(path) for path in image.layers]}
                          for image in images]))
        return 0
    rows = [("REFERENCE", "DIGEST", "PLATFORM", "SIZE")] + [
        (image.reference, image.digest[:19], image.platform, size_text(image.size))
        for image in images]
    print_table(rows, numbers=(3,))
    return 0


def rmi_command(args: argparse.Namespace) -> int:
    reference, *layers = Store().remove(args.reference)
    print(f"Untagged: {reference}")
    for digest in layers:
        print(f"Deleted: {digest}")
    return 0


def prune_command(args: argparse.Namespace) -> int:
    store = Store()
    removed = store.prune()
    print(f"removed {len(removed)} layers from {store.root}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    print(json.dumps(Store().inspect(args.reference), indent=2))
    return 0


def login_command(args: argparse.Namespace) -> int:
    registry = registry_name(args.registry)
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin \
        else getpass.getpass(f"Password for {args.username} at {registry}: ")
    if not password:
        raise ConfigError("minictr login: an empty password (give it on stdin with "
                          "--password-stdin)")
    credentials = auth.Credentials(args.username, password)
    api = "registry-1.docker.io" if registry == DOCKER_HUB else registry
    Transport(api, credentials).get("/v2/").close()  # wrong credentials are refused here
    path = auth.login(registry, credentials)
    print(f"Login Succeeded (kept in {path})")
    return 0


def logout_command(args: argparse.Namespace) -> int:
    registry = registry_name(args.registry)
    if not auth.logout(registry):
        print(f"Not logged in to {registry}")
        return 0
    print(f"Removing login credentials for {registry}")
    return 0


def registry_name(text: str) -> str:
    """`https://index.docker.io/v1/`, `docker.io` -> docker.io; `host:port` as it is."""
    host = text.removeprefix("https://").removeprefix("http://").split("/")[0]
    if host in HUB_ALIASES:
        return DOCKER_HUB
    if not HOST_RE.fullmatch(host):
        raise ConfigError(f"{text!r} is not a registry (host or host:port)")
    return host
