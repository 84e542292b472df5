"""Known container escapes, each tried from inside a default container and shown to fail.

Every test checks both sides: inside, the exact way the attempt failed (the helper, escape.c,
prints `BLOCKED <ERRNO>`); outside, that the host did not change (no file planted, no sysctl
rewritten, no key, mount or connection made). Some classes are also tried with the defaults
loosened, to show that the layer left still holds (seccomp=False: the capabilities and the
host-owned namespaces; user=False: the capabilities and seccomp).
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import socket
import stat
import tty
import uuid
from pathlib import Path

import pytest

from pytest_minictr import Mount

from .conftest import (
    checked,
    container_uid_range,
    host_mount_points,
    key_users_in_container_range,
    libc,
    proc_status,
    running,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")

# CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID NET_BIND_SERVICE
DEFAULT_CAPABILITIES = 0x4FB


@pytest.fixture
def host_marker():
    """A file in the host's root directory: what an escaped process would see or change."""
    marker = Path("/") / f"minictr-escape-marker-{uuid.uuid4().hex}"
    marker.write_text("host")
    yield marker
    marker.unlink()


@pytest.fixture
def root_owned_dir(tmp_path) -> Path:
    """An empty host directory owned by host root, mode 0755 (pytest makes them 0700)."""
    directory = tmp_path / "host-dir"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    return directory


# --- the filesystem view ----------------------------------------------------------------------

@pytest.mark.parametrize("capabilities, inside", [
    ((), "BLOCKED EPERM at chroot"),                        # chroot needs CAP_SYS_CHROOT
    (("SYS_CHROOT",), "CONTAINED at the container root"),   # given it: nothing above the root
], ids=["default", "SYS_CHROOT"])
def test_chroot_dotdot_escape_fails(escape, capabilities, inside):
    """chroot into a subdir, fchdir to an fd of the old root opened before, chdir .. x64."""
    planted = Path("/") / f"minictr-chroot-planted-{uuid.uuid4().hex}"
    assert escape("chroot", str(planted), capabilities=capabilities) == inside
    assert not planted.exists()


def test_leaked_directory_fd_escape_fails(escape, escapes, runtime, escape_rootfs):
    """CVE-2024-21626 (runc): a host directory fd leaked into the command. Only 0-2 reach it,
    and the init's fds and root (where host fds could hide) are closed to it."""
    assert escapes([["fds"], ["open", "/proc/1/fd"], ["readlink", "/proc/1/fd/0"],
                    ["open", "/proc/1/root/.."], ["readlink", "/proc/1/cwd"]]) == [
        "FDS 0 1 2", "BLOCKED EACCES", "BLOCKED EACCES", "BLOCKED EACCES", "BLOCKED EACCES"]
    with running(runtime, escape_rootfs, "exec sleep 30", ready="sleep") as (_, command):
        assert sorted(os.listdir(f"/proc/{command}/fd")) == ["0", "1", "2"]


def test_proc_pid_root_escape_fails(escapes, host_marker):
    """/proc/PID/root of a process outside the container's root would be a path to the host:
    the init's is closed, our own leads to the container's "/" and .. goes no higher."""
    assert escapes([["readlink", "/proc/1/root"], ["readlink", "/proc/self/root"],
                    ["same", "/proc/self/root/..", "/"],
                    ["open", f"/proc/self/root/../{host_marker.name}"],
                    ["write", f"/proc/self/root/../../{host_marker.name}", "changed"]]) == [
        "BLOCKED EACCES", "LINK /", "SAME", "BLOCKED ENOENT", "BLOCKED ENOENT at open"]
    assert host_marker.read_text() == "host"


def open_by_handle_at_inode_2(mount_fd: int) -> int:
    """The host's own view of the handle the helper forges: ext4's FILEID_INO32_GEN, ino 2."""
    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                    ("ino", ctypes.c_uint), ("generation", ctypes.c_uint)]
    handle = FileHandle(8, 1, 2, 0)
    flags = os.O_RDONLY | os.O_DIRECTORY
    return checked(libc.syscall(304, mount_fd, ctypes.byref(handle), flags), "open_by_handle_at")


@pytest.mark.parametrize("loosened", [{}, {"seccomp": False}], ids=["default", "no-seccomp"])
def test_open_by_handle_at_shocker_escape_fails(escape, root_owned_dir, loosened):
    """"Shocker" (2014): open_by_handle_at with a forged handle of inode 2 (the root of an ext*
    filesystem), through a bind of a host directory, opens the host's root directory. Denied
    by seccomp, and without it by the missing CAP_DAC_READ_SEARCH."""
    if os.uname().machine != "x86_64":
        pytest.skip("open_by_handle_at is called by its x86-64 number")
    host_fd = os.open(root_owned_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:  # the handle is a real one: from the host it opens that filesystem's root
        opened = open_by_handle_at_inode_2(host_fd)
        assert os.fstat(opened).st_ino == 2
        os.close(opened)
    except OSError as error:
        pytest.skip(f"the host's /tmp is not an ext4 that the handle fits ({error.strerror})")
    finally:
        os.close(host_fd)
    assert escape("open_by_handle", "/host", mounts=[Mount.bind(root_owned_dir, "/host")],
                  **loosened) == "BLOCKED EPERM"
    assert os.listdir(root_owned_dir) == []


MOUNT_ATTEMPTS = {
    "mount a tmpfs": ["mount", "tmpfs", "/mnt"],
    "mount a fresh proc": ["mount", "proc", "/tmp/proc"],
    "remount / read-write": ["remount_rw", "/"],
    "remount /proc/sys read-write": ["remount_rw", "/proc/sys"],
    "unmount the /proc/keys mask": ["umount", "/proc/keys"],
    "unmount /proc/sys": ["umount", "/proc/sys"],
}


@pytest.mark.parametrize("loosened", [
    {}, {"seccomp": False}, {"seccomp": False, "capabilities": ["SYS_ADMIN"]},
], ids=["default", "no-seccomp", "no-seccomp-with-SYS_ADMIN"])
def test_mount_and_remount_escapes_fail(escapes, loosened):
    """Mounting, remounting read-write or unmounting a mask: seccomp denies the calls, and
    without it they still fail: the mount namespace belongs to the host's user namespace, so
    no capability of container root (even SYS_ADMIN) counts over it."""
    before = host_mount_points()
    outcomes = escapes(list(MOUNT_ATTEMPTS.values()), **loosened)
    assert dict(zip(MOUNT_ATTEMPTS, outcomes, strict=True)) \
        == dict.fromkeys(MOUNT_ATTEMPTS, "BLOCKED EPERM")
    assert host_mount_points() == before


@pytest.mark.parametrize("user", [None, False], ids=["default", "host-root"])
def test_mknod_device_escape_fails(escapes, tmp_path, user):
    """A device node of /dev/mem (char 1:1) or of a disk (block 8:0) opens host memory or
    disks from any namespace: no CAP_MKNOD (and in the user namespace, never); /dev has none."""
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)  # so that only the privilege to make nodes is in question
    assert escapes([["mknod", "/out/mem", "c", "1", "1"], ["mknod", "/out/sda", "b", "8", "0"],
                    ["open", "/dev/mem"]],
                   mounts=[Mount.bind(out, "/out", read_only=False)], user=user) == [
        "BLOCKED EPERM", "BLOCKED EPERM", "BLOCKED ENOENT"]
    assert os.listdir(out) == []


# --- processes --------------------------------------------------------------------------------

@pytest.mark.parametrize("capabilities", [(), ("SYS_PTRACE",)], ids=["default", "SYS_PTRACE"])
def test_ptrace_of_the_init_and_host_pids_fails(escapes, capabilities):
    """PTRACE_ATTACH to PID 1 (host root's process, non-dumpable, with pipes to the launcher)
    fails even with CAP_SYS_PTRACE: that counts only in the container's user namespace. No
    host pid is visible: the test's own pid is "no such process" inside."""
    host_pid = os.getpid()
    pids_line, attach_init, attach_host = escapes(
        [["pids"], ["ptrace", "1"], ["ptrace", str(host_pid)]], capabilities=capabilities)
    pids = [int(pid) for pid in pids_line.split()[1:]]
    assert pids[0] == 1 and len(pids) <= 5 and max(pids) < 10, pids_line
    assert attach_init == "BLOCKED EPERM"
    if host_pid not in pids:
        assert attach_host == "BLOCKED ESRCH"
    assert proc_status("self")["TracerPid"] == "0"


# --- host kernel knobs ------------------------------------------------------------------------

KERNEL_KNOBS = ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/panic",
                "/proc/sys/kernel/modprobe", "/proc/sys/vm/overcommit_memory"]


@pytest.mark.parametrize("knob", KERNEL_KNOBS)
@pytest.mark.parametrize("user, inside", [(None, "BLOCKED EACCES at open"),
                                          (False, "BLOCKED EROFS at open")],
                         ids=["default", "host-root"])
def test_kernel_sysctl_write_escape_fails(escape, knob, user, inside):
    """core_pattern ("|/path": the kernel runs it as host root at the next crash) and the other
    /proc/sys knobs are the host kernel's. Container root is not the files' owner (EACCES);
    host root inside meets the read-only bind (EROFS)."""
    if not os.path.exists(knob):
        pytest.skip(f"{knob}: not in this kernel")
    before = Path(knob).read_text()
    try:
        assert escape("write", knob, "|/minictr-planted-handler", user=user) == inside
    finally:
        after = Path(knob).read_text()
        if after != before:  # put it back before failing: the host must not keep it
            Path(knob).write_text(before)
    assert after == before


def test_sysfs_write_and_mount_escape_fails(escapes):
    """/sys (uevent_helper: a program the kernel runs as host root) is not there, and a sysfs
    cannot be mounted (EPERM: the network namespace's sysfs needs privilege over it)."""
    knob = next((path for path in ("/sys/kernel/uevent_helper", "/sys/kernel/profiling",
                                   "/sys/kernel/rcu_expedited") if os.path.exists(path)), None)
    before = Path(knob).read_text() if knob else None
    assert escapes([["open", "/sys/kernel"], ["write", "/sys/kernel/uevent_helper", "/x"],
                    ["mount", "sysfs", "/sys"], ["mount", "sysfs", "/tmp/sys"]]) == [
        "BLOCKED ENOENT", "BLOCKED ENOENT at open", "BLOCKED EPERM", "BLOCKED EPERM"]
    if knob:
        assert Path(knob).read_text() == before


def v1_hierarchies() -> list[str]:
    """Mount options naming each cgroup v1 hierarchy of the host ("memory", "none,name=x")."""
    controllers = {line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines()
                   if not line.startswith("#")}
    names = sorted(path.name for path in Path("/sys/fs/cgroup").iterdir()
                   if (path / "release_agent").exists())
    return [name if set(name.split(",")) <= controllers else f"none,name={name}"
            for name in names]


def read_release_agents() -> dict[str, str]:
    return {str(path): path.read_text() for path in Path("/sys/fs/cgroup").glob("*/release_agent")}


@pytest.mark.parametrize("loosened, reached", [
    ({}, {"BLOCKED EPERM at unshare"}),
    # no seccomp: a user namespace of its own may mount a v1 hierarchy; release_agent is then
    # absent (not the hierarchy's root) or owned by an unmapped host root (EACCES)
    ({"seccomp": False}, {"BLOCKED ENOENT at release_agent", "BLOCKED EACCES at release_agent"}),
    # and as host root, the kernel's own check (CVE-2022-0492's fix: CAP_SYS_ADMIN of the host)
    ({"seccomp": False, "user": False},
     {"BLOCKED ENOENT at release_agent", "BLOCKED EPERM at release_agent"}),
], ids=["default", "no-seccomp", "no-seccomp-host-root"])
def test_cgroup_release_agent_escape_fails(escapes, loosened, reached):
    """CVE-2022-0492: mount a cgroup v1 hierarchy, set release_agent to a program of ours, and
    the host kernel runs it as host root. No cgroup fs is visible, none can be mounted."""
    hierarchies = v1_hierarchies()
    if not hierarchies:
        pytest.skip("no cgroup v1 hierarchy on this host")
    before = read_release_agents()
    fstypes, visible, mounted, *agents = escapes(
        [["fstypes"], ["open", "/sys/fs/cgroup"],
         ["mount", "cgroup", "/tmp/cgroup", hierarchies[0]],
         *(["release_agent", options] for options in hierarchies)], **loosened)
    assert not {"cgroup", "cgroup2"} & set(fstypes.split()[1:]), fstypes
    assert visible == "BLOCKED ENOENT" and mounted == "BLOCKED EPERM"
    assert set(agents) <= reached, agents
    assert read_release_agents() == before


# --- network and IPC --------------------------------------------------------------------------

@pytest.mark.parametrize("network, inside", [("loopback", "BLOCKED ECONNREFUSED"),
                                             ("none", "BLOCKED ENETUNREACH")],
                         ids=["loopback", "no-network"])
def test_host_tcp_listener_is_unreachable(escape, network, inside):
    """A service on the host's 127.0.0.1 (a database, a docker socket over TCP) trusts local
    clients: the container's 127.0.0.1 is its own."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert escape("connect_tcp", str(port), network=network) == inside
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_host_abstract_unix_socket_is_unreachable(escape):
    """Abstract unix sockets ("\\0name") have no file a mount namespace could hide: only the
    network namespace separates them (X11, containerd-shim's CVE-2020-15257)."""
    name = f"minictr-escape-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen()
        assert escape("connect_abstract", name) == "BLOCKED ECONNREFUSED"
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_raw_socket_escape_fails(escapes):
    """Raw and packet sockets forge packets and sniff an interface: no CAP_NET_RAW."""
    assert escapes([["raw_socket", "packet"], ["raw_socket", "inet"]]) == [
        "BLOCKED EPERM", "BLOCKED EPERM"]
    # none of the host network namespace's raw or packet sockets is container root's
    ids = container_uid_range()
    for table, uid_column in (("/proc/net/packet", 7), ("/proc/net/raw", 7)):
        rows = Path(table).read_text().splitlines()[1:]
        assert not [row for row in rows if int(row.split()[uid_column]) in ids]


IPC_CREAT, IPC_EXCL, IPC_RMID = 0o1000, 0o2000, 0


def sysv_row(table: str, key: int) -> list[str]:
    rows = Path(f"/proc/sysvipc/{table}").read_text().splitlines()
    return next(row.split() for row in rows if row.split()[0] == str(key))


def test_host_sysv_ipc_objects_are_unreachable(escapes):
    """SysV shared memory and message queues are found by a key any process may guess: the
    IPC namespace gives the container a table of its own."""
    key = random.randrange(0x4D430000, 0x4D43FFFF)
    shm = checked(libc.shmget(key, 4096, IPC_CREAT | IPC_EXCL | 0o666), "shmget")
    try:
        msg = checked(libc.msgget(key, IPC_CREAT | IPC_EXCL | 0o666), "msgget")
        try:
            shm_table, shm_found, msg_found = escapes(
                [["read", "/proc/sysvipc/shm"], ["shmget", hex(key)], ["msgget", hex(key)]])
            assert (shm_found, msg_found) == ("BLOCKED ENOENT", "BLOCKED ENOENT")
            header = len(Path("/proc/sysvipc/shm").read_text().splitlines()[0]) + 1
            assert shm_table == f"READ {header}"  # the header line only
            # on the host: nobody attached to the memory, no message in the queue
            assert sysv_row("shm", key)[6] == "0" and sysv_row("msg", key)[4] == "0"
        finally:
            libc.msgctl(msg, IPC_RMID, None)
    finally:
        libc.shmctl(shm, IPC_RMID, None)


KEY_SPEC_USER_KEYRING, KEYCTL_INVALIDATE = -4, 21


@pytest.mark.parametrize("user", [None, False], ids=["default", "host-root"])
def test_keyring_escape_fails(escapes, user):
    """The kernel keyring is not namespaced: as host root, the command would share root's user
    keyring with the host. keyctl and add_key are denied, /proc/keys reads as empty."""
    name = f"minictr-host-secret-{uuid.uuid4().hex}"
    key = checked(libc.syscall(248, b"user", name.encode(), b"secret", 6,
                             ctypes.c_int(KEY_SPEC_USER_KEYRING)), "add_key")
    try:
        assert name in Path("/proc/keys").read_text()  # host root sees its key
        assert escapes([["syscall", "keyctl"], ["syscall", "add_key"], ["read", "/proc/keys"]],
                       user=user) == ["BLOCKED EPERM", "BLOCKED EPERM", "READ 0"]
        assert "minictr-planted-key" not in Path("/proc/keys").read_text()
        assert key_users_in_container_range() == []
    finally:
        libc.syscall(250, KEYCTL_INVALIDATE, key)


# --- privilege ----------------------------------------------------------------------------------

def test_nested_user_namespace_fails(escapes):
    """A user namespace of its own gives back every capability (inside it) and with them
    mounts, cgroup v1 (CVE-2022-0492), netfilter... Denied through unshare and clone;
    clone3, whose flags seccomp cannot read, is ENOSYS (libc falls back to clone)."""
    before = host_mount_points()
    assert escapes([["syscall", "unshare_user"], ["syscall", "clone_user"],
                    ["syscall", "clone3"], ["userns_proc"]]) == [
        "BLOCKED EPERM", "BLOCKED EPERM", "BLOCKED ENOSYS", "BLOCKED EPERM at unshare"]
    assert host_mount_points() == before


@pytest.mark.parametrize("user", [None, False], ids=["default", "host-root"])
def test_setuid_binary_gives_no_privilege(escapes, escape_helper, tmp_path, root_owned_dir,
                                          user):
    """A setuid-root program run by an unprivileged user inside stays unprivileged: binds are
    nosuid, no_new_privs is set, and (by default) host root is not even mapped. So it cannot
    plant a file in a host directory only root may write."""
    suid_dir = tmp_path / "suid"
    suid_dir.mkdir(mode=0o755)
    os.chmod(suid_dir, 0o755)
    program = suid_dir / "escape"
    shutil.copy(escape_helper, program)
    os.chown(program, 0, 0)
    os.chmod(program, 0o4755)
    euid, planted = escapes(
        [["as_user", "1000", "/suid/escape", "euid"],
         ["as_user", "1000", "/suid/escape", "create", "/out/planted"]],
        mounts=[Mount.bind(suid_dir, "/suid"), Mount.bind(root_owned_dir, "/out",
                                                          read_only=False)], user=user)
    assert (euid, planted) == ("EUID 1000", "BLOCKED EACCES")
    assert os.listdir(root_owned_dir) == []
    assert stat.S_IMODE(os.stat(program).st_mode) == 0o4755  # it was setuid all along


@pytest.mark.parametrize("call", ["bpf", "userfaultfd", "perf_event_open", "kexec_load",
                                  "init_module", "finit_module", "delete_module",
                                  "io_uring_setup", "setns", "syslog", "swapon"])
def test_kernel_attack_surface_syscall_fails(escape, call):
    """The calls behind most kernel exploits (bpf, userfaultfd, perf_event_open, io_uring) and
    those that change the running kernel (kexec, modules) or host state: seccomp's EPERM."""
    modules = loaded_modules()
    swaps = Path("/proc/swaps").read_text()
    assert escape("syscall", call) == "BLOCKED EPERM"
    assert loaded_modules() == modules
    assert Path("/proc/swaps").read_text() == swaps


def loaded_modules() -> set[str]:
    """Names only: use counts change as other tests mount overlays."""
    if not os.path.exists("/proc/modules"):
        return set()
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}


@pytest.mark.parametrize("seccomp", [True, False], ids=["default", "no-seccomp"])
def test_tiocsti_terminal_injection_fails(runtime, escape_rootfs, seccomp):
    """CVE-2016-7545 / CVE-2017-5226: TIOCSTI on a terminal shared with the host pushes input
    that a host shell reads and runs. Seccomp denies it; without seccomp the kernel does, as
    the terminal is not the command's controlling one (it runs in a session of its own)."""
    main, terminal = os.openpty()
    try:
        tty.setraw(terminal)
        result = runtime.run(escape_rootfs, ["escape", "tiocsti"], stdin=terminal,
                             seccomp=seccomp, timeout=30).wait()
        legacy = Path("/proc/sys/dev/tty/legacy_tiocsti")
        kernel_says = "EIO" if legacy.exists() and legacy.read_text().strip() == "0" else "EPERM"
        assert result.stdout.decode() == f"BLOCKED {'EPERM' if seccomp else kernel_says}\n"
        os.set_blocking(terminal, False)
        with pytest.raises(BlockingIOError):  # nothing waits to be read by the host's reader
            os.read(terminal, 16)
    finally:
        os.close(main)
        os.close(terminal)


def test_capabilities_no_new_privs_and_seccomp_are_the_defaults(runtime, escape_rootfs):
    """What the command holds, from inside and as the host sees the same process: the 8
    default capabilities in every set but inheritable and ambient, no_new_privs, a seccomp
    filter, a container-range host uid and a user namespace that is not the host's."""
    with running(runtime, escape_rootfs, "cat /proc/self/status; exec sleep 30",
                 ready="sleep") as (container, command):
        seen_from_host = proc_status(command)
        userns = os.readlink(f"/proc/{command}/ns/user")
    inside = dict(line.split(":\t") for line in container.wait().stdout.decode().splitlines()
                  if ":\t" in line)
    for status in (inside, seen_from_host):
        assert {key: int(status[key], 16) for key in ("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                       "CapAmb")} == {
            "CapInh": 0, "CapPrm": DEFAULT_CAPABILITIES, "CapEff": DEFAULT_CAPABILITIES,
            "CapBnd": DEFAULT_CAPABILITIES, "CapAmb": 0}
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    assert inside["Uid"].split() == ["0"] * 4
    assert {int(uid) for uid in seen_from_host["Uid"].split()} == {container_uid_range()[0]}
    assert userns != os.readlink("/proc/self/ns/user")


@pytest.mark.parametrize("user, inside, owner", [
    (None, "BLOCKED EACCES", None),   # container root is an unprivileged host uid
    (False, "CREATED /out/x", 0),     # user=False: host root, which owns the dir
], ids=["default", "host-root"])
def test_container_root_cannot_write_a_root_owned_host_dir(escape, root_owned_dir, user,
                                                           inside, owner):
    """A writable bind of a host directory owned by host root: by default, container root is
    "other" there (no setuid-root file planted for a host user to run later). With user=False
    it is host root, and writes (the difference user=False makes)."""
    assert escape("create", "/out/x", user=user,
                  mounts=[Mount.bind(root_owned_dir, "/out", read_only=False)]) == inside
    created = root_owned_dir / "x"
    if owner is None:
        assert not created.exists()
    else:
        assert created.stat().st_uid == owner

