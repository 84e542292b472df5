"""Crash recovery: a caller SIGKILLed with containers running, timeouts pending and a rootfs
half built; a launcher SIGKILLed alone; a disk full mid-build. Afterwards the host holds
nothing of theirs (or the next runtime reaps it), and the cache no half-built entry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_minictr import ContainerRuntime, LauncherError, RootfsBuilder, RootfsError
from pytest_minictr.host.linux import mount, umount2
from pytest_minictr.plugin import LAYER_PREFIX, layer_parent, remove_stale_layers

from .helpers import eventually, process_gone

REPO = Path(__file__).resolve().parent.parent
CALLER = textwrap.dedent("""
    import os, sys, tempfile, threading, time
    from pytest_minictr import ContainerRuntime, RootfsBuilder
    rootfs, cache = sys.argv[1], sys.argv[2]
    runtime = ContainerRuntime()
    layer = tempfile.mkdtemp(prefix=f"minictr-layer-{os.getpid()}-", dir=sys.argv[3])
    containers = [runtime.run(rootfs, ["sleep", "600"]),
                  runtime.run(rootfs, ["sleep", "601"], timeout=300),
                  runtime.run(rootfs, ["sleep", "602"], memory_limit="64M", layer=layer)]
    threading.Thread(target=RootfsBuilder(cache_dir=cache).build,
                     kwargs={"recipe": "python3"}, daemon=True).start()
    print(runtime._client.pid, *(c.pid for c in containers), flush=True)
    time.sleep(0.2)  # the build is under way
    print("ready", flush=True)
    time.sleep(600)
""")


def cgroups_of(launcher: int) -> list[str]:
    return [os.path.join(directory, name)
            for directory, subdirs, _ in os.walk("/sys/fs/cgroup")
            if os.path.basename(directory) == "minictr"
            for name in subdirs if name.startswith(f"minictr-{launcher}@")]


@pytest.fixture
def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups, mounts)")


def test_a_killed_caller_leaves_nothing_the_next_run_does_not_reap(rootfs, tmp_path,
                                                                   needs_root):
    cache = tmp_path / "cache"
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(rootfs), str(cache),
                               layer_parent()], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    launcher, *inits = map(int, caller.stdout.readline().split())
    assert caller.stdout.readline().strip() == "ready"
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    # the launcher sees its caller's socket close: it kills every container and exits
    assert eventually(lambda: process_gone(launcher) and all(process_gone(pid) for pid in inits))
    # what it could not remove, the next runtime does (its start reaps dead launchers')
    with ContainerRuntime() as runtime:
        assert runtime.run(rootfs, ["true"]).wait().returncode == 0
    assert cgroups_of(launcher) == []
    remove_stale_layers()  # what the plugin does when a session starts
    assert not list(Path(layer_parent()).glob(f"{LAYER_PREFIX}{caller.pid}-*"))
    # the cache: no entry without its manifest; the dead builder's temp dir goes at the
    # next build in that cache
    RootfsBuilder(cache_dir=cache).build(binaries=["true"])
    for entry in cache.iterdir():
        assert not entry.name.startswith(".tmp-"), entry
        assert (entry / "manifest.json").is_file() and (entry / "rootfs").is_dir(), entry


def test_a_killed_launcher_takes_its_containers_and_is_replaced(rootfs):
    runtime = ContainerRuntime()
    try:
        container = runtime.run(rootfs, ["sleep", "600"])
        launcher = runtime._client.pid
        helpers = children_of(launcher)  # the container, spares, the zygote (as root)
        os.kill(launcher, signal.SIGKILL)
        with pytest.raises(LauncherError, match="launcher died"):
            container.wait(timeout=10)
        assert eventually(lambda: all(process_gone(pid) for pid in helpers))
        assert runtime.run(rootfs, ["true"]).wait().returncode == 0  # a fresh launcher
        assert runtime._client.pid != launcher
    finally:
        runtime.close()


def children_of(pid: int) -> dict[int, int]:
    """The children of `pid`: their pids and how many PID namespaces deep each one is (a
    spare or an init, PID 1 of its own, is one deeper than the launcher's other children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
            found[int(entry.name)] = len(nspid.split()) - 1
    return found


def test_inits_are_the_launchers_children_and_a_killed_zygote_costs_no_container(
        rootfs, needs_root):
    with ContainerRuntime() as runtime:
        container = runtime.run(rootfs, ["sleep", "600"])
        launcher = runtime._client.pid
        children = children_of(launcher)
        # forked by the zygote, yet the launcher's child: it reaps it, its death kills it
        assert container.pid in children
        zygotes = [pid for pid, depth in children.items() if depth == 1]
        assert len(zygotes) == 1, children
        os.kill(zygotes[0], signal.SIGKILL)
        # more than the spares made so far: the launcher forks the next ones itself
        for _ in range(5):
            assert runtime.run(rootfs, ["echo", "hi"]).wait().stdout == b"hi\n"
        assert container.kill().returncode == -signal.SIGKILL
        assert runtime._client.pid == launcher


def test_a_full_disk_while_building_is_a_clear_error_and_no_half_entry(tmp_path, needs_root):
    cache = tmp_path / "cache"
    cache.mkdir()
    mount("tmpfs", str(cache), "tmpfs", 0, "size=512k")
    try:
        with pytest.raises(RootfsError, match="No space left on device"):
            RootfsBuilder(cache_dir=cache).build(recipe="minimal")
        assert os.listdir(cache) == []
    finally:
        umount2(str(cache))
