"""`minictr doctor`: what this host lets minictr do, each finding with the fix.

Users of bwrap and nsjail meet "setting up uid map: Permission denied" and are left to guess.
Here the host is examined the way a container would use it: a throwaway child rehearses the
default container's setup with the launcher's own code (user namespace, mount namespace,
overlay, /proc, pivot_root, seccomp) and the first step that fails is explained from what the
host says about itself (sysctls, AppArmor, being inside another container). The plugin's
"unavailable" message and its report header come from here too, so all three agree.

Everything doctor reads or tries goes through a `Host` (`doctor.host`), which tests replace
with a simulated one (the isolation itself is never faked: the real rehearsal runs on the real
kernel).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pytest_minictr import __version__, native
from pytest_minictr.doctor.host import REHEARSAL_STEPS, Host, Rehearsal
from pytest_minictr.doctor.places import inside_a_container, recognise

MINIMUM_KERNEL = (5, 11)  # close_range(CLOSE_RANGE_CLOEXEC), overlayfs in a user namespace
IDMAP_KERNEL = (5, 12)    # mount_setattr(MOUNT_ATTR_IDMAP)
AUTHORITY = "AppArmor (kernel.apparmor_restrict_unprivileged_userns)"


@dataclass(frozen=True)
class Finding:
    """One thing checked: whether it works, what was seen, how to fix it; `needed`: the
    default container cannot run without it (the exit status counts only those)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    needed: bool = True
    tried: bool = True


def examine(host: Host | None = None, rehearse: bool = True) -> list[Finding]:
    """Every finding, needed ones first. Without the rehearsal (a few tenths of a second, for
    the report header of every pytest run) only what the host says about itself is read."""
    host = host or Host()
    if not rehearse:
        return [check_kernel(host), check_user_namespaces(host, None), check_cgroups(host),
                check_setup_path(host)]
    rehearsal = host.rehearse()
    findings = [check_kernel(host), check_user_namespaces(host, rehearsal),
                *check_container_setup(rehearsal), check_seccomp(host, rehearsal),
                check_cache(host), check_ldd(host), check_cgroups(host), check_setup_path(host)]
    if host.euid() == 0:
        findings.append(check_idmap(host))
    else:
        findings.append(check_id_mapping(host))
    place = check_place(host, findings)
    return findings if place is None else [*findings, place]


def check_place(host: Host, findings: list[Finding]) -> Finding | None:
    """The CI runner or container recognised here, with the change its owner makes when
    anything (limits included) is missing."""
    place = recognise(host)
    if place is None:
        return None
    cgroups = next(f for f in findings if f.name == "cgroups")
    lacking = not ready(findings) or not cgroups.ok
    return Finding("this host", not (lacking and place.fix), f"{place.name} ({place.evidence})",
                   place.fix, needed=False)


def kernel_version(release: str) -> tuple[int, int]:
    parts = release.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def check_kernel(host: Host) -> Finding:
    release = host.kernel()
    wanted = ".".join(map(str, MINIMUM_KERNEL))
    ok = kernel_version(release) >= MINIMUM_KERNEL
    return Finding("kernel", ok, f"Linux {release} ({wanted} or later needed)",
                   "" if ok else f"upgrade to Linux {wanted} or later")


def check_user_namespaces(host: Host, rehearsal: Rehearsal | None) -> Finding:
    """From the rehearsal; without one, from the sysctls and the like alone."""
    who = "root" if host.euid() == 0 else host.user()
    blocker = known_blocker(host, refused=rehearsal is not None)
    if rehearsal is None:
        if blocker is None:
            return Finding("user namespaces", True, f"{who}: nothing here forbids them")
        return Finding("user namespaces", False, f"{who} cannot make one: {blocker[0]}",
                       blocker[1])
    if rehearsal.reached("user namespace", REHEARSAL_STEPS):
        purpose = ("container root is an unprivileged host uid" if host.euid() == 0
                   else "root inside, your own uid outside")
        return Finding("user namespaces", True, f"{who} can make them ({purpose})")
    reason, fix = blocker or (
        "the kernel refused, for a reason it did not name (a security module?)",
        "check `dmesg` for denials; user namespaces must be enabled in the kernel "
        "(CONFIG_USER_NS)")
    if host.euid() == 0:
        fix += "; meanwhile user=False (--no-userns) runs containers as host root"
    return Finding("user namespaces", False,
                   f"{who} cannot make one ({rehearsal.error}): {reason}", fix)


def known_blocker(host: Host, refused: bool) -> tuple[str, str] | None:
    """Why user namespaces are refused here, and the fix: the first known cause found.
    `refused`: the kernel did refuse one (being in a container is a cause only then)."""
    def sysctl(name: str) -> str | None:
        value = host.read(f"/proc/sys/{name.replace('.', '/')}")
        return None if value is None else value.strip()

    if sysctl("user.max_user_namespaces") == "0":
        return ("the sysctl user.max_user_namespaces is 0",
                "sudo sysctl -w user.max_user_namespaces=15000")
    if sysctl("kernel.unprivileged_userns_clone") == "0" and host.euid() != 0:
        return ("the sysctl kernel.unprivileged_userns_clone is 0 (Debian's switch)",
                "sudo sysctl -w kernel.unprivileged_userns_clone=1")
    if sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1" and host.euid() != 0:
        return (f"{AUTHORITY} keeps unprivileged users from them (Ubuntu 23.10 and later)",
                "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor "
                "profile granting `userns,` to your python (see apparmor.d(5))")
    if refused and inside_a_container(host):
        return ("this runs inside a container whose seccomp profile or privileges forbid "
                "them (Docker's default profile does)",
                "run the outer container with --security-opt seccomp=unconfined "
                "--security-opt apparmor=unconfined (or --privileged)")
    return None


def check_container_setup(rehearsal: Rehearsal) -> list[Finding]:
    """The rehearsal's steps after the user namespace, each passed, failed or not reached."""
    findings = []
    fixes = {"mount namespace": "mount namespaces must be enabled (CONFIG_NAMESPACES)",
             "overlayfs": "load the overlay module (`sudo modprobe overlay`); without root, "
                          "Linux 5.11 or later is needed",
             "/proc": "mounting /proc needs a PID namespace and a /proc of the host that "
                      "nothing is mounted over (not the case in some containers)",
             "pivot_root": "the rootfs must not be on a ramfs (initramfs) root"}
    for step in REHEARSAL_STEPS[1:-1]:
        if rehearsal.reached(step, REHEARSAL_STEPS):
            findings.append(Finding(step, True, "works"))
        elif rehearsal.failed_step == step:
            findings.append(Finding(step, False, f"failed: {rehearsal.error}", fixes[step]))
        else:
            findings.append(Finding(step, False, f"not tried: {rehearsal.failed_step} failed",
                                    tried=False))
    return findings


def check_seccomp(host: Host, rehearsal: Rehearsal) -> Finding:
    from pytest_minictr.container.seccomp import ARCHITECTURES
    machine = host.machine()
    if machine not in ARCHITECTURES:
        return Finding("seccomp filter", False, f"no syscall table for {machine}",
                       "run containers with seccomp=False (--no-seccomp)")
    if rehearsal.failed_step == "seccomp":
        return Finding("seccomp filter", False, f"failed: {rehearsal.error}",
                       "the kernel needs CONFIG_SECCOMP_FILTER; else seccomp=False")
    if not rehearsal.reached("seccomp", REHEARSAL_STEPS):
        return Finding("seccomp filter", False, f"not tried: {rehearsal.failed_step} failed",
                       tried=False)
    return Finding("seccomp filter", True, f"installs ({machine})")


def check_setup_path(host: Host) -> Finding:
    """Which path carries out a container's setup: the native core, or pure Python (the same
    containers, a slower start, and a python3 PID 1 whose command line names host paths)."""
    choice = host.setup_path()
    built = choice.path is native.SetupPath.NATIVE or native.SWITCH in choice.reason
    return Finding("setup path", built, str(choice),
                   "" if built else "install pytest-minictr from its platform wheel, or "
                   "reinstall it where a C compiler (gcc) is installed", needed=False)


def check_cache(host: Host) -> Finding:
    cache = host.cache_dir()
    if host.writable(cache):
        return Finding("rootfs cache", True, f"{cache} is writable")
    return Finding("rootfs cache", False, f"{cache} is not writable",
                   "set MINICTR_CACHE_DIR (or --minictr-cache-dir) to a directory you own")


def check_ldd(host: Host) -> Finding:
    if host.which("ldd"):
        return Finding("ldd", True, "present (the rootfs builder resolves libraries with it)")
    return Finding("ldd", False, "missing: a rootfs cannot be built from host binaries",
                   "install libc-bin (Debian, Ubuntu) or glibc-common (Fedora); or give a "
                   "prepared rootfs (--minictr-rootfs)")


def check_cgroups(host: Host) -> Finding:
    name, problem = host.cgroups()
    if not problem:
        return Finding("cgroups", True, f"{name}: memory, CPU and pids limits available",
                       needed=False)
    reason, fix = _split_fix(problem)
    found = "none usable" if name is None else f"{name}, but no limits"
    return Finding("cgroups", False, f"{found}: {reason} (containers run without limits)", fix,
                   needed=False)


def _split_fix(problem: str) -> tuple[str, str]:
    """Our cgroup errors end with the fix after '; ' (else ': '): (reason, fix)."""
    for marker in ("; ", ": "):
        if marker in problem:
            reason, fix = problem.rsplit(marker, 1)
            return reason, fix
    return problem, ""


def check_idmap(host: Host) -> Finding:
    ok = kernel_version(host.kernel()) >= IDMAP_KERNEL
    detail = ("a rootfs of your own is shown to container root through an idmapped mount"
              if ok else "no idmapped mounts (Linux 5.12+): root-owned directories of a "
              "rootfs of your own are read-only inside (the cache is not affected)")
    return Finding("idmapped mounts", ok, detail, "" if ok else "upgrade to Linux 5.12+",
                   needed=False)


def check_id_mapping(host: Host) -> Finding:
    from pytest_minictr.host.idmap import MAPPED_IDS, subordinate_range
    user = host.user()
    helpers = [name for name in ("newuidmap", "newgidmap") if not host.which(name)]
    files = {name: host.read(f"/etc/{name}") for name in ("subuid", "subgid")}
    lacking = [name for name, text in files.items()
               if subordinate_range(text, user, str(host.euid())) is None]
    if not helpers and not lacking:
        return Finding("id mapping", True, f"full: newuidmap and /etc/subuid ranges of {user} "
                                           "give the container other users than root",
                       needed=False)
    missing = [*helpers, *(f"a range of at least {MAPPED_IDS} ids for {user} in /etc/{name}"
                           for name in lacking)]
    fixes = ["sudo apt install uidmap"] if helpers else []
    if lacking:
        # the first range no account has, in either file (so that both agree), never below
        # useradd's SUB_UID_MIN: another account's range would give its files to ours
        start = max([SUB_ID_MIN, *(end for text in files.values() for end in _range_ends(text))])
        flags = " ".join(f"--add-{name}s {start}-{start + MAPPED_IDS - 1}" for name in lacking)
        fixes.append(f"sudo usermod {flags} {user}")
    return Finding("id mapping", False,
                   f"single uid: root only inside (missing: {', '.join(missing)})",
                   "; ".join(fixes), needed=False)


SUB_ID_MIN = 100000  # useradd's SUB_UID_MIN and SUB_GID_MIN (login.defs)


def _range_ends(entries: str | None) -> list[int]:
    """The first id past each range of /etc/subuid-style `entries`."""
    ends = []
    for line in (entries or "").splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            ends.append(int(fields[1]) + int(fields[2]))
    return ends


def ready(findings: list[Finding]) -> bool:
    return all(f.ok for f in findings if f.needed)


def problem_text(findings: list[Finding]) -> str | None:
    """One sentence per needed finding that failed, with its fix; None when all work."""
    failed = [f for f in findings if f.needed and not f.ok and f.tried]
    if not failed:
        return None
    return "; ".join(f"{f.name}: {f.detail}" + (f" (fix: {f.fix})" if f.fix else "")
                     for f in failed)


def header(findings: list[Finding], host: Host | None = None) -> str:
    """The plugin's one-line summary of what this host does."""
    host = host or Host()
    cgroups = next(f for f in findings if f.name == "cgroups")
    users = next(f for f in findings if f.name == "user namespaces")
    limits = "limits" if cgroups.ok else "no limits"
    return (f"{'root' if host.euid() == 0 else 'rootless'}, "
            f"cgroups {host.cgroups()[0] or 'none'} ({limits}), "
            f"user namespaces {'yes' if users.ok else 'no'}, "
            f"setup {host.setup_path().path.value}, "
            f"{'ready' if ready(findings) else 'NOT READY (minictr doctor)'}")


def render(findings: list[Finding], host: Host | None = None) -> str:
    host = host or Host()
    lines = [f"minictr {__version__} doctor: {'root' if host.euid() == 0 else host.user()}, "
             f"Linux {host.kernel()}, {host.machine()}"]
    for finding in findings:
        mark = "✓" if finding.ok else "?" if not finding.tried else "✗" if finding.needed \
            else "-"
        lines.append(f"{mark} {finding.name}: {finding.detail}")
        if finding.fix and not finding.ok:
            lines.append(f"    fix: {finding.fix}")
    lines.append("the default container works here" if ready(findings) else
                 "the default container cannot run here: fix what is marked ✗ (? was not "
                 "tried, for want of what failed before it)")
    return "\n".join(lines)


def to_json(findings: list[Finding]) -> str:
    return json.dumps({"ready": ready(findings), "checks": [asdict(f) for f in findings]},
                      indent=2)


def main(as_json: bool, host: Host | None = None, out: Callable[[str], None] = print) -> int:
    findings = examine(host)
    out(to_json(findings) if as_json else render(findings, host))
    return 0 if ready(findings) else 1
