"""What the plugin needs of the host: a rootfs for a test's settings, whether containers can
run here at all, the per-test writable layers, and a failed test's container in its report."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from pytest_minictr.caller.result import STDERR_TAIL, Result, tail
from pytest_minictr.doctor import checks as doctor
from pytest_minictr.errors import RootfsError, UnsupportedError
from pytest_minictr.images.image import Image
from pytest_minictr.images.resolve import resolve
from pytest_minictr.keywords import ContainerSettings
from pytest_minictr.rootfs.builder import RootfsBuilder
from pytest_minictr.rootfs.defaults import BASE_BINARIES

LAYER_PREFIX = "minictr-layer-"  # + the owner's pid: a layer of a dead owner is removed


def resolve_rootfs(settings: ContainerSettings, builder: RootfsBuilder,
                   memo: dict) -> Path | Image:
    """The image asked for (pulled if missing), a prepared rootfs if one was given, else one
    built (cached) from host binaries. Looked up once per session and set of binaries (or
    image): checking the cache stats every file it copied, milliseconds a test would pay for
    nothing (a host upgrade mid-run is not our business)."""
    if settings.image is not None:
        if settings.image not in memo:
            memo[settings.image] = resolve(settings.image)
        found: Image = memo[settings.image]
        return found
    if settings.binaries is None and settings.recipe is None and settings.rootfs is not None:
        return Path(settings.rootfs)
    key = (settings.recipe, settings.binaries)
    if key not in memo:
        try:
            memo[key] = _build(settings, builder)
        except RootfsError as error:
            if settings.recipe is None and settings.binaries is None:
                raise
            raise RootfsError(f"@pytest.mark.container: {error}") from None  # the marker's
    return memo[key]


def _build(settings: ContainerSettings, builder: RootfsBuilder) -> Path:
    if settings.recipe is not None:
        return builder.build(recipe=settings.recipe, binaries=settings.binaries or ())
    wanted = settings.binaries if settings.binaries is not None else BASE_BINARIES
    present = [name for name in dict.fromkeys(("sh", *wanted))
               if name in (settings.binaries or ()) or shutil.which(name)]
    return builder.build(binaries=present)


def check_host_can_run_containers() -> None:
    """UnsupportedError with doctor's words where the default container cannot run."""
    if not os.path.exists("/proc/self/ns/pid"):
        raise UnsupportedError("this system has no Linux namespaces (/proc/self/ns is missing)")
    problem = doctor.problem_text(host_findings())
    if problem is not None:
        raise UnsupportedError(f"{problem} (`minictr doctor` says more)")


@functools.lru_cache(maxsize=1)
def host_findings() -> list:
    """doctor's findings, rehearsal included: once per process, at the first container."""
    return doctor.examine()


def remove_layer(layer: str) -> None:
    """Remove a writable layer. overlayfs leaves its work dir's inner `work` at mode 000: root
    removes it anyway, its owner only after giving itself the rights back."""
    for directory, subdirs, _ in os.walk(layer):
        for name in subdirs:
            path = os.path.join(directory, name)
            # never through a symlink: what the container left there may point anywhere
            # (nothing of it runs any more, so it cannot swap one in meanwhile)
            if not os.path.islink(path):
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass  # not ours: rmtree's ignore_errors covers what stays
    shutil.rmtree(layer, ignore_errors=True)


def layer_parent() -> str:
    """Where per-test layers go: /dev/shm, a tmpfs on most hosts (a layer in memory is faster
    to make and to drop, and what a container writes counts against its memory limit), else
    the temp dir."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) \
        else tempfile.gettempdir()


def remove_stale_layers() -> None:
    """Writable layers of test processes that died (SIGKILL) before their teardown."""
    for layer in Path(layer_parent()).glob(f"{LAYER_PREFIX}*"):
        owner = layer.name[len(LAYER_PREFIX):].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            remove_layer(str(layer))


def describe_result(result: Result) -> str:
    how = ("timed out" if result.timed_out else "OOM-killed" if result.oom_killed
           else f"returncode {result.returncode}")
    return f"command: {list(result.args)!r}\n{how}, wall {result.wall_time:.3f} s\n" \
           f"stderr (last {STDERR_TAIL} bytes):\n{tail(result.stderr) or '(empty)'}"
