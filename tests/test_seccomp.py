"""The seccomp filter as data: its syscall numbers against the kernel's headers, and the shape
of the program. (That the kernel applies it is shown from inside containers, tests/security.)"""

from __future__ import annotations

import errno
import os
import re
import struct
from pathlib import Path

import pytest

from pytest_minictr.container import seccomp

# Where Debian's linux-libc-dev puts each table; the generic one serves aarch64.
HEADERS = {
    "x86_64": ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"),
    "aarch64": ("/usr/include/asm-generic/unistd.h",),
}


def header_numbers(arch: str) -> dict[str, int]:
    for candidate in HEADERS[arch]:
        if Path(candidate).exists():
            text = Path(candidate).read_text()
            return {name: int(number) for name, number in
                    re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", text)}
    pytest.skip(f"no kernel headers for {arch} ({', '.join(HEADERS[arch])}): "
                "install linux-libc-dev")


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHITECTURES))
def test_syscall_numbers_match_the_kernel_headers(arch):
    known = header_numbers(arch)
    ours = seccomp.ARCHITECTURES[arch].numbers
    compared = {name: number for name, number in ours.items() if name in known}
    assert compared == {name: known[name] for name in compared}
    assert len(compared) >= len(ours) - 2  # only calls newer than the headers go unchecked


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHITECTURES))
def test_every_filtered_call_the_architecture_has_is_numbered(arch):
    known = header_numbers(arch)
    missing = [name for name in seccomp.FILTERED
               if name in known and name not in seccomp.ARCHITECTURES[arch].numbers]
    assert missing == []


def instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]


def compared_numbers(program: bytes) -> list[int]:
    return [k for code, _, _, k in instructions(program) if code == seccomp.BPF_JEQ_K]


def test_the_program_checks_the_architecture_first_and_denies_by_shared_returns():
    arch = seccomp.ARCHITECTURES["x86_64"]
    program = instructions(seccomp.build_filter((), arch))
    assert program[0] == (seccomp.BPF_LD_W_ABS, 0, 0, seccomp.OFFSET_ARCH)
    assert program[1][3] == arch.audit_arch
    assert [k for _, _, _, k in program[-3:]] == [
        seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_ERRNO | errno.EPERM,
        seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS]
    # one comparison per denied call, each jumping to its shared return
    at = [k for _, _, _, k in program].index(arch.numbers["keyctl"])
    eperm = len(program) - 2
    assert program[at] == (seccomp.BPF_JEQ_K, eperm - at - 1, 0, arch.numbers["keyctl"])
    assert len(program) < 100  # kept short: the kernel translates it for every container


def test_allowed_calls_are_left_out():
    arch = seccomp.ARCHITECTURES["x86_64"]
    default = compared_numbers(seccomp.build_filter((), arch))
    loosened = compared_numbers(seccomp.build_filter(("keyctl", "clone"), arch))
    assert arch.numbers["keyctl"] in default and arch.numbers["keyctl"] not in loosened
    assert arch.numbers["clone"] in default and arch.numbers["clone"] not in loosened
    assert arch.numbers["mount"] in loosened


@pytest.mark.skipif(os.uname().machine not in seccomp.ARCHITECTURES,
                    reason="no syscall table for this machine")
def test_the_default_program_is_built_once_however_it_is_asked_for():
    # the launcher asks with no argument, an init with the spec's (empty) allowed calls
    assert seccomp.host_filter() is seccomp.host_filter(()) is seccomp.host_filter([])
