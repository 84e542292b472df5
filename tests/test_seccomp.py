"""The seccomp filter as data: its syscall numbers against the kernel's headers, and the shape
of the program. (That the kernel applies it is shown from inside containers, tests/security.)"""

from __future__ import annotations

import errno
import os
import re
import struct
from pathlib import Path

import pytest

from pytest_minictr import confinement
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
    missing = [name for name in confinement.FILTERED
               if name in known and name not in seccomp.ARCHITECTURES[arch].numbers]
    assert missing == []


def test_the_filter_has_what_the_names_promise():
    # The names users are checked against (`confinement`) and the tables the filter is built
    # from are declared apart: the edge cannot import the container side.
    assert sorted(seccomp.ARCHITECTURES) == sorted(confinement.SECCOMP_MACHINES)
    assert {rule[0] for rule in seccomp.ARGUMENT_RULES} == \
        set(confinement.DENIED_FOR_SOME_ARGUMENTS)


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
    at = program.index(next(i for i in program if i[0] == seccomp.BPF_JEQ_K
                            and i[3] == arch.numbers["keyctl"]))
    eperm = len(program) - 2
    assert program[at] == (seccomp.BPF_JEQ_K, eperm - at - 1, 0, arch.numbers["keyctl"])


def run_filter(program: bytes, audit_arch: int, number: int, args: tuple[int, ...] = ()
               ) -> tuple[int, int]:
    """Classic BPF as the kernel runs a seccomp filter (the instructions ours uses): its
    return value, and how many instructions it took."""
    code = instructions(program)
    data = struct.pack("=iIQ6Q", number, audit_arch, 0, *(args + (0,) * (6 - len(args))))
    pc, accumulator, steps = 0, 0, 0
    while True:
        op, jt, jf, k = code[pc]
        steps += 1
        if op == seccomp.BPF_LD_W_ABS:
            accumulator = struct.unpack_from("=I", data, k)[0]
        elif op == seccomp.BPF_RET_K:
            return k, steps
        else:
            taken = {seccomp.BPF_JEQ_K: accumulator == k, seccomp.BPF_JGE_K: accumulator >= k,
                     seccomp.BPF_JSET_K: bool(accumulator & k)}[op]
            pc += jt if taken else jf
        pc += 1


def expected_return(name: str | None, allowed: tuple[str, ...], args: tuple[int, ...]) -> int:
    """What the filter's rules say of a call (None: one the filter does not name)."""
    if name in allowed or name is None:
        return seccomp.SECCOMP_RET_ALLOW
    if name in confinement.DENIED:
        return seccomp.SECCOMP_RET_ERRNO | errno.EPERM
    if name in confinement.NOT_IMPLEMENTED:
        return seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
    for rule_name, argument, test, value in seccomp.ARGUMENT_RULES:
        argument_value = args[argument] if argument < len(args) else 0
        if rule_name == name and (argument_value & value if test == "flag"
                                  else argument_value == value):
            return seccomp.SECCOMP_RET_ERRNO | errno.EPERM
    return seccomp.SECCOMP_RET_ALLOW


@pytest.mark.parametrize("arch_name", sorted(seccomp.ARCHITECTURES))
@pytest.mark.parametrize("allowed", [(), ("keyctl", "clone", "ioctl", "clone3"), ("mount",)])
def test_every_call_number_gets_what_the_rules_say(arch_name, allowed):
    arch = seccomp.ARCHITECTURES[arch_name]
    program = seccomp.build_filter(allowed, arch)
    names = {number: name for name, number in arch.numbers.items()}
    argument_cases = [(), (seccomp.CLONE_NEWUSER | 0x11, seccomp.TIOCSTI),
                      (0x11, seccomp.TIOCLINUX), (0, 0x5401)]
    for number in range(1024):
        for args in argument_cases:
            assert run_filter(program, arch.audit_arch, number, args)[0] == expected_return(
                names.get(number), allowed, args), (names.get(number, number), args)
    enosys = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert run_filter(program, 0x40000003, 1)[0] == enosys  # another ABI's table (i386)
    if arch.foreign_bit is not None:  # x32's numbers, whatever the call
        assert run_filter(program, arch.audit_arch, arch.foreign_bit | 1)[0] == enosys


def test_an_allowed_call_is_decided_in_a_few_instructions():
    # The kernel runs the filter for every call number when it is installed (to cache those
    # always allowed): that walk is paid on each container start.
    arch = seccomp.ARCHITECTURES["x86_64"]
    program = seccomp.build_filter((), arch)
    filtered = set(arch.numbers.values())
    walks = [run_filter(program, arch.audit_arch, number)[1] for number in range(460)
             if number not in filtered]
    assert max(walks) <= 16, max(walks)  # (a chain of comparisons took 70)


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
