"""Where doctor runs, when that is a CI runner or a container: each such place blocks
containers in its own way and is unblocked by a change only its owner can make (a workflow
step, a runner's config.toml, the outer `docker run`), so doctor names the place and that
change rather than a generic sysctl.

What each place does to us:
- GitHub Actions' Ubuntu 24.04 runners confine unprivileged user namespaces through AppArmor
  (kernel.apparmor_restrict_unprivileged_userns=1): the runner user (not root) is refused one
  and the sysctl must be lifted with sudo in a step; no cgroup is delegated to that user.
- Docker's defaults (seccomp profile, AppArmor's docker-default, masked /proc paths, a
  read-only cgroupfs) refuse unshare(CLONE_NEWUSER), a fresh /proc mount (the kernel will not
  mount a proc whose view is partly hidden) and cgroup writes. GitLab CI's Docker executor and
  Docker-in-Docker runners are such containers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_minictr.doctor.host import Host

APPARMOR_SYSCTL = "kernel.apparmor_restrict_unprivileged_userns"

GITHUB_FIX = (f"add a step before the tests: `sudo sysctl -w {APPARMOR_SYSCTL}=0` (Ubuntu "
              "24.04 runners confine unprivileged user namespaces); limits need root: run the "
              "suite with `sudo -E env PATH=$PATH python -m pytest`")
DOCKER_FIX = ("run the outer container with `--privileged` (simplest; limits need it, as Docker "
              "mounts cgroupfs read-only otherwise), or with `--security-opt seccomp=unconfined "
              "--security-opt apparmor=unconfined --security-opt systempaths=unconfined` for "
              "containers without limits")
GITLAB_FIX = ("in the runner's config.toml, `[runners.docker] privileged = true` (the Docker "
              "executor's job containers refuse user namespaces and /proc mounts otherwise)")


@dataclass(frozen=True)
class Place:
    """A recognised place: what it is, the evidence seen, and what its owner changes."""

    name: str
    evidence: str
    fix: str


def inside_a_container(host: Host) -> bool:
    markers = (host.read("/.dockerenv"), host.read("/run/.containerenv"))
    if any(marker is not None for marker in markers):
        return True
    environ = host.read("/proc/1/environ") or ""
    return "container=" in environ


def container_evidence(host: Host) -> str:
    if host.read("/.dockerenv") is not None:
        return "/.dockerenv"
    if host.read("/run/.containerenv") is not None:
        return "/run/.containerenv"
    return "container= in PID 1's environment"


def apparmor_restricts(host: Host) -> bool:
    value = host.read(f"/proc/sys/{APPARMOR_SYSCTL.replace('.', '/')}")
    return value is not None and value.strip() == "1"


def recognise(host: Host) -> Place | None:
    """The CI runner or container this runs in, if any: the container first, as what blocks
    us there is the container, whoever started it."""
    contained = inside_a_container(host)
    if host.environ("GITLAB_CI") == "true":
        evidence = "GITLAB_CI=true" + (f", {container_evidence(host)}" if contained else "")
        return Place("GitLab CI job" + (" in a container (Docker executor)" if contained
                                        else " (shell executor)"),
                     evidence, GITLAB_FIX if contained else "")
    if contained:
        ci = " (a GitHub Actions container job)" if host.environ("GITHUB_ACTIONS") else ""
        return Place(f"a container{ci}: Docker, Podman or Docker-in-Docker",
                     container_evidence(host), DOCKER_FIX)
    if host.environ("GITHUB_ACTIONS") == "true":
        restricted = apparmor_restricts(host)
        evidence = "GITHUB_ACTIONS=true" + (f", {APPARMOR_SYSCTL}=1" if restricted else "")
        return Place("GitHub Actions runner", evidence,
                     GITHUB_FIX if restricted or host.euid() != 0 else "")
    return None
