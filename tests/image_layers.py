"""Image layers for the tests, built from this host's binaries in the form the image store
keeps them: overlayfs' own (a whiteout is a 0/0 character device, an opaque directory has
the xattr trusted.overlay.opaque=y; in a user namespace, user.overlay.opaque)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


def make_layers(store: Path, base: Path) -> tuple[Path, Path]:
    """A bottom layer (a copy of `base`, plus what the top one hides) and a top layer with
    accounts, a new file, a whiteout and an opaque directory."""
    bottom, top = store / "layers" / "bottom", store / "layers" / "top"
    shutil.copytree(base, bottom, symlinks=True)
    (bottom / "srv").mkdir()
    (bottom / "srv" / "gone.txt").write_text("deleted by the top layer\n")
    (bottom / "srv" / "kept.txt").write_text("from the bottom layer\n")
    (bottom / "opt" / "old").mkdir(parents=True)
    (bottom / "opt" / "old" / "a.txt").write_text("hidden by an opaque directory\n")
    for path in ("etc", "srv", "opt/old", "app"):
        (top / path).mkdir(parents=True)
    (top / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                        "app:x:1234:2345::/app:/bin/sh\n")
    (top / "etc" / "group").write_text("root:x:0:\nstaff:x:4321:\n")
    (top / "etc" / "hosts").write_text("10.9.8.7\tthe-image-own\n")
    (top / "srv" / "new.txt").write_text("from the top layer\n")
    os.mknod(top / "srv" / "gone.txt", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (top / "opt" / "old" / "b.txt").write_text("in the opaque directory\n")
    os.setxattr(top / "opt" / "old", "trusted.overlay.opaque", b"y")
    return bottom, top
