"""The default seccomp filter: classic BPF assembled here, no libseccomp.

In the spirit of Docker's default profile, but as a deny list: the calls it names (listed in
`confinement`, with the checks of `allow_syscalls=`; their numbers are here) reach the host
kernel's global state (keys, modules, clocks, swap, mounts, new namespaces) or are the usual
first step of a kernel exploit (bpf, userfaultfd, io_uring, perf_event_open), and an ordinary
program under test never needs them. Everything else is left to the namespaces and the dropped
capabilities. A test that needs one of them says so with `allow_syscalls=`.

The program checks the architecture first: a 64-bit x86 process can still enter the kernel
through the 32-bit (int 0x80) and x32 tables, whose numbers mean other calls, so any call that
is not of the native table fails with ENOSYS (a 32-bit program cannot run under this filter).
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from dataclasses import dataclass

from pytest_minictr.confinement import DENIED, NOT_IMPLEMENTED
from pytest_minictr.host.linux import SeccompProgram

# linux/seccomp.h, linux/filter.h, linux/audit.h
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
BPF_LD_W_ABS = 0x20      # BPF_LD | BPF_W | BPF_ABS: A = seccomp_data[k]
BPF_JEQ_K = 0x15         # BPF_JMP | BPF_JEQ | BPF_K
BPF_JSET_K = 0x45        # BPF_JMP | BPF_JSET | BPF_K
BPF_JGE_K = 0x35         # BPF_JMP | BPF_JGE | BPF_K
BPF_RET_K = 0x06
OFFSET_NR, OFFSET_ARCH = 0, 4
X32_SYSCALL_BIT = 0x40000000
CLONE_NEWUSER = 0x10000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C


@dataclass(frozen=True)
class Architecture:
    audit_arch: int
    numbers: dict[str, int]
    foreign_bit: int | None = None  # numbers with this bit set belong to another ABI


def _offset_of_arg(index: int) -> int:
    """struct seccomp_data: nr, arch, instruction_pointer (u64), then args[6] (u64). On these
    little-endian machines the low 32 bits of an argument come first."""
    return 16 + 8 * index


# Per architecture, the number of each call we filter (from the kernel's unistd tables; the
# test suite compares them with the installed headers). Calls an architecture lacks are absent.
_COMMON_NEW = {"move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431,
               "fsmount": 432, "fspick": 433, "mount_setattr": 442, "quotactl_fd": 443,
               "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
               "clone3": 435, "open_tree_attr": 467}
ARCHITECTURES = {
    "x86_64": Architecture(0xC000003E, {
        **_COMMON_NEW,
        "add_key": 248, "keyctl": 250, "request_key": 249, "kexec_load": 246,
        "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "create_module": 174, "query_module": 178, "get_kernel_syms": 177, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "lookup_dcookie": 212, "mount": 165,
        "umount2": 166, "pivot_root": 155, "swapon": 167, "swapoff": 168, "reboot": 169,
        "acct": 163, "open_by_handle_at": 304, "settimeofday": 164, "clock_settime": 227,
        "clock_adjtime": 305, "setns": 308, "iopl": 172, "ioperm": 173, "uselib": 134,
        "ustat": 136, "sysfs": 139, "_sysctl": 156, "nfsservctl": 180, "syslog": 103,
        "quotactl": 179, "vhangup": 153, "kcmp": 312, "fanotify_init": 300, "clone": 56,
        "unshare": 272, "ioctl": 16}, foreign_bit=X32_SYSCALL_BIT),
    "aarch64": Architecture(0xC00000B7, {
        **_COMMON_NEW,
        "add_key": 217, "keyctl": 219, "request_key": 218, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "lookup_dcookie": 18,
        "mount": 40, "umount2": 39, "pivot_root": 41, "swapon": 224, "swapoff": 225,
        "reboot": 142, "acct": 89, "open_by_handle_at": 265, "settimeofday": 170,
        "clock_settime": 112, "clock_adjtime": 266, "setns": 268, "nfsservctl": 42,
        "syslog": 116, "quotactl": 60, "vhangup": 58, "kcmp": 272, "fanotify_init": 262,
        "clone": 220, "unshare": 97, "ioctl": 29}),
}

# Denied for some arguments only: (call, argument, test, value) -> EPERM. A new user namespace
# gives back every capability (inside it) and with them the kernel surface the rest of this
# filter closes; ioctl TIOCSTI/TIOCLINUX push input into a terminal we may share.
ARGUMENT_RULES = (
    ("clone", 0, "flag", CLONE_NEWUSER),
    ("unshare", 0, "flag", CLONE_NEWUSER),
    ("ioctl", 1, "equal", TIOCSTI),
    ("ioctl", 1, "equal", TIOCLINUX),
)


def host_filter(allowed: tuple[str, ...] = ()) -> SeccompProgram:
    """build_filter() for this machine (the spec checked that it has a table), built once:
    the launcher builds the default one before forking any init, which inherits it."""
    # one cache key however it is called: lru_cache tells host_filter() from host_filter(()),
    # and an init would build the default program again (a tenth of a millisecond each)
    return _host_filter(tuple(allowed))


def host_filter_hex(allowed: tuple[str, ...] = ()) -> str:
    """host_filter()'s program as hex text: how a plan carries it to the native core."""
    return _host_filter_hex(tuple(allowed))


@functools.lru_cache(maxsize=16)
def _host_filter_hex(allowed: tuple[str, ...]) -> str:
    return build_filter(allowed, ARCHITECTURES[os.uname().machine]).hex()


@functools.lru_cache(maxsize=16)
def _host_filter(allowed: tuple[str, ...]) -> SeccompProgram:
    return SeccompProgram(build_filter(allowed, ARCHITECTURES[os.uname().machine]))


def build_filter(allowed: tuple[str, ...], arch: Architecture) -> bytes:
    """The BPF program (struct sock_filter[]) of the default filter, minus `allowed` calls.

    The call number is looked up in a search tree (a few JGE splits down to leaves of up to
    LEAF comparisons), not a chain of comparisons: when a filter is installed the kernel
    (5.11+) runs it once for each of the ~460 call numbers, under a spinlock, to cache those
    it always allows. With a chain each allowed number walked all 60 comparisons, on the path
    of every container start; the tree takes half the time (docs/performance.md). Calls
    filtered on an argument end in a block that loads it. Every jump goes forward (a BPF
    rule), to shared returns."""
    bpf = _Assembler()
    bpf.load(OFFSET_ARCH)
    bpf.jump(BPF_JEQ_K, arch.audit_arch, if_false="ENOSYS")
    bpf.load(OFFSET_NR)
    if arch.foreign_bit is not None:
        bpf.jump(BPF_JGE_K, arch.foreign_bit, if_true="ENOSYS")
    targets, rules = _targets(allowed, arch)
    _search_tree(bpf, sorted(targets.items()))
    for number, tests in rules.items():
        bpf.label(targets[number])
        for argument, test, value in tests:
            bpf.load(_offset_of_arg(argument))
            bpf.jump(BPF_JSET_K if test == "flag" else BPF_JEQ_K, value, if_true="EPERM")
        bpf.ret(SECCOMP_RET_ALLOW)
    bpf.label("EPERM")
    bpf.ret(SECCOMP_RET_ERRNO | errno.EPERM)
    bpf.label("ENOSYS")
    bpf.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    return bpf.program()


LEAF = 4  # comparisons at most in a leaf of the search tree


def _targets(allowed: tuple[str, ...], arch: Architecture
             ) -> tuple[dict[int, str], dict[int, list[tuple[int, str, int]]]]:
    """Where each filtered call number jumps (a return's label, or its argument block's),
    and the argument tests of those filtered on an argument (a denied call is denied whole)."""
    targets: dict[int, str] = {}
    for names, label in ((DENIED, "EPERM"), (NOT_IMPLEMENTED, "ENOSYS")):
        for name in names:
            if name not in allowed and name in arch.numbers:
                targets.setdefault(arch.numbers[name], label)
    rules: dict[int, list[tuple[int, str, int]]] = {}
    for name, argument, test, value in ARGUMENT_RULES:
        number = arch.numbers.get(name)
        if name not in allowed and number is not None and targets.get(number, name) == name:
            targets[number] = name
            rules.setdefault(number, []).append((argument, test, value))
    return targets, rules


def _search_tree(bpf: _Assembler, items: list[tuple[int, str]]) -> None:
    """Jump to the target of the call number in the accumulator if it is among `items`
    (sorted by number), else allow the call."""
    if len(items) <= LEAF:
        for number, target in items:
            bpf.jump(BPF_JEQ_K, number, if_true=target)
        bpf.ret(SECCOMP_RET_ALLOW)
        return
    middle = len(items) // 2
    upper = f"numbers from {items[middle][0]}"
    bpf.jump(BPF_JGE_K, items[middle][0], if_true=upper)
    _search_tree(bpf, items[:middle])
    bpf.label(upper)
    _search_tree(bpf, items[middle:])


class _Assembler:
    """struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }; a jump goes to a label, or to
    the next instruction; offsets (instructions skipped) are resolved at the end."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | None, str | None, int]] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.code.append((BPF_LD_W_ABS, None, None, offset))

    def jump(self, code: int, value: int, if_true: str | None = None,
             if_false: str | None = None) -> None:
        self.code.append((code, if_true, if_false, value))

    def ret(self, value: int) -> None:
        self.code.append((BPF_RET_K, None, None, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def program(self) -> bytes:
        def skip(index: int, label: str | None) -> int:
            distance = 0 if label is None else self.labels[label] - index - 1
            if not 0 <= distance <= 255:
                raise ValueError(f"seccomp: jump to {label} out of reach ({distance})")
            return distance
        return b"".join(struct.pack("=HBBI", code, skip(i, jt), skip(i, jf), k)
                        for i, (code, jt, jf, k) in enumerate(self.code))
