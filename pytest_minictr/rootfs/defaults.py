"""The default rootfs of the plugin's `container` fixture and of `minictr run` without
--rootfs: a shell and the usual coreutils, those of them this host has."""

from __future__ import annotations

import shutil
from collections.abc import Iterable

# Every container can run a shell string; these come along where the host has them.
BASE_BINARIES = ("sh", "env", "echo", "cat", "ls", "true", "false", "sleep", "mkdir", "rm",
                 "cp", "mv", "touch", "head", "tail", "wc", "grep", "sed", "seq", "sort", "tr",
                 "cut", "printf", "test", "id", "hostname", "uname", "pwd", "ln", "chmod",
                 "stat", "date", "basename", "dirname", "expr", "kill", "ps")


def default_binaries(required: Iterable[str] = ()) -> list[str]:
    """`required` (which must exist: the builder names a missing one), then sh and the base
    set where the host has them; each once."""
    required = list(required)
    return list(dict.fromkeys([*required, *(name for name in ("sh", *BASE_BINARIES)
                                            if shutil.which(name))]))
