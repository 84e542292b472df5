"""A running container's hold on the image layers it runs on: a shared flock on each layer's
lock file in its image store (`images.store`), taken by the launcher before the container's
setup and let go once its init is reaped. `Store.prune`, and so `rmi`, removes a layer only
while it can lock it alone, so a layer under a running container stays for a later prune.

Only `os`, `fcntl` and `time` here: the launcher imports this, and pays for every import at
its start.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from pytest_minictr.errors import ConfigError

HOLD_WAIT = 10.0  # seconds a start waits for a prune that holds one of its layers


def lock_file(store_root: Path, name: str) -> Path:
    """The flock file of `name` ("index", or "layer-<hex>" for a layer) in a store."""
    return store_root / "locks" / f"{name}.lock"


def layer_in_store(tree: str | Path) -> tuple[Path, str] | None:
    """The store and the layer's hex digest of a layer's tree, <store>/layers/sha256/<hex>/tree;
    None for a directory laid out otherwise (layers given by hand)."""
    path = Path(tree)
    if path.name != "tree" or len(path.parents) < 5 or path.parents[1].name != "sha256" \
            or path.parents[2].name != "layers":
        return None
    return path.parents[3], path.parent.name


def hold_layers(layers: Sequence[str | Path]) -> tuple[int, ...]:
    """A shared lock on each of `layers` that lies in a store; the fds that hold them (closing
    them lets go). ConfigError if one is gone: a prune removed it after the image was looked
    up. A store we cannot open a lock file in is another account's, which only it prunes."""
    fds: list[int] = []
    try:
        for tree in layers:
            place = layer_in_store(tree)
            if place is None:
                continue
            try:
                fd = os.open(lock_file(place[0], f"layer-{place[1]}"),
                             os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                continue
            fds.append(fd)
            _lock_shared(fd, tree)
            if not (Path(tree).parent / "layer.json").exists():
                raise ConfigError(f"the image layer {tree} was removed (by `minictr rmi` or "
                                  "`prune`) after the image was looked up: pull it again")
    except BaseException:
        let_go(fds)
        raise
    return tuple(fds)


def let_go(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def _lock_shared(fd: int, tree: str | Path) -> None:
    # a prune holds a layer's lock only while it removes that layer; waiting without bound
    # would stall the launcher, and every container it runs, behind a stuck one
    deadline = time.monotonic() + HOLD_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ConfigError(f"the image layer {tree} stayed locked for {HOLD_WAIT:g} s "
                                  "(a `minictr prune` or a pull that hangs?)") from None
            time.sleep(0.01)
