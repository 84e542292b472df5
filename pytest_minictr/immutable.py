"""What the rootfs cache and the image store hold is shared by every container made from it:
it is never written, so a container may not get it through a writable bind (with user=False
container root is host root, and would write into every later container's base).

Both are told apart by what is on disk, wherever they live (`MINICTR_CACHE_DIR`, an
account's XDG directories, a test's temporary store): an image store's root holds the file
`MARK`; a rootfs cache entry is a `rootfs/` beside its `manifest.json` (`rootfs.cache`)."""

from __future__ import annotations

import os

MARK = ".minictr-immutable"  # in the root of a tree no container may write
_CACHE_TREE, _CACHE_MANIFEST = "rootfs", "manifest.json"


def shared_tree_of(path: str) -> str | None:
    """The cache entry's tree or the store that `path` (a real path) is in or is, else None."""
    here = path
    while True:
        if os.path.exists(os.path.join(here, MARK)) or (
                os.path.basename(here) == _CACHE_TREE
                and os.path.isfile(os.path.join(os.path.dirname(here), _CACHE_MANIFEST))):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def mark(directory: str | os.PathLike[str]) -> None:
    """Make `directory` (a store's root) one that no container may write through a bind."""
    with open(os.path.join(directory, MARK), "a"):
        pass
