"""The setup plan of a sandboxed test body (see `plugin.sandbox`): the steps of `plan`, in
the order `plan` gives them, for a process that is a fork of the pytest worker rather than a
command: no rootfs and no exec, the host's tree read-only in their place.

    root:     join the spare's cgroup and namespaces → host tree read-only → /tmp → binds
              → /dev and /proc (the spare's) → pivot_root → hostname and loopback
              → rlimits → user namespace → capabilities → seccomp → the test function
    rootless: join cgroup → user namespace → namespaces (keeper) → stage → /proc and /dev
              → host tree ... as above, without the user namespace step (init, then body)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

from pytest_minictr.container.plan import (
    OTHER_NAMESPACES,
    Ref,
    Step,
    Where,
    bring_up_loopback,
    install_seccomp,
    join_cgroup,
    mount_proc_and_dev,
    name_and_network,
    pivot_into_root,
)
from pytest_minictr.container.security import capability_mask, rlimits_with
from pytest_minictr.host import linux
from pytest_minictr.spec import Security

# The body is a fork of the pytest worker (it lives in its memory), not a command: no rootfs, no
# exec. As root it joins a spare's cgroup and namespaces (its PID one through the fork, see
# `plugin.sandbox`), whose stage, /proc and /dev are built already; without root it makes its
# own, in a keeper and an init (see `container.body`).

# The cgroup namespace after the cgroup; the mount namespace last: it moves our root.
BODY_JOINED = (("net", linux.CLONE_NEWNET), ("uts", linux.CLONE_NEWUTS),
               ("ipc", linux.CLONE_NEWIPC), ("cgroup", linux.CLONE_NEWCGROUP),
               ("mnt", linux.CLONE_NEWNS))

# Actions only a body's plan names. A body is a fork of the pytest worker, so its plan is
# always carried out by the Python executor: the native core (`container/native`) runs
# containers' plans and has no need of these.
BODY_ONLY_ACTIONS = frozenset({"bind_host_root", "close_inherited_handles", "cover_etc_files",
                               "hand_over_service_addresses", "hide_host_path", "seal_hidden",
                               "mount_tmp_over_host"})


@dataclass(frozen=True)
class BodyView:
    """What a sandboxed test body sees and may do (see `plugin.sandbox`)."""

    cwd: str
    # host dirs shown read-only as they are: the test's files under /tmp, and what the test
    # needs inside a hidden home (the project's tree, the venv)
    read_only: tuple[str, ...]
    writable: tuple[str, ...]    # host paths bound read-write (tmp_path, writable=[...])
    hostname: str
    network: str
    user_namespace: bool
    security: Security
    # the published (address, port) of the services the worker runs: reachable from the
    # body at the same address, through the launcher's relay (see `container.network`)
    services: tuple[tuple[str, int], ...] = ()
    # host paths covered (a directory by an empty tmpfs, a file by /dev/null): homes, secrets
    hidden: tuple[str, ...] = ()


class BodyPlan(NamedTuple):
    namespaces: tuple[Step, ...]   # root: in the body; without root: in its keeper
    view: tuple[Step, ...]         # root: in the body; without root: in its init (PID 1)
    confinement: tuple[Step, ...]  # in the body, last before the test function runs
    rootless: bool


def body_plan(view: BodyView, where: Where, joined: tuple[int, ...] = (),
              relay: int | None = None) -> BodyPlan:
    """`joined`: as root, fds of the spare's namespaces, in BODY_JOINED order; `relay`: the
    socket to the launcher's relay of `view.services`, if any."""
    return BodyPlan(body_namespaces(where, joined),
                    body_view(view, where) + services_inside(view, relay),
                    body_confinement(view, where), where.rootless)


def body_namespaces(where: Where, joined: tuple[int, ...]) -> tuple[Step, ...]:
    if not where.rootless:  # the user namespace comes last (see body_confinement)
        return (*join_cgroup(where),
                *(Step("namespaces", f"join the spare's {name} namespace", "setns", (fd, kind))
                  for (name, kind), fd in zip(BODY_JOINED, joined, strict=True)),
                Step("namespaces", "close the spare's namespaces", "close_fds", joined))
    # without root the user namespace comes first: it owns the others (see `enter_namespaces`)
    return (*join_cgroup(where),
            Step("user namespace", "unshare the user namespace", "unshare",
                 (linux.CLONE_NEWUSER,)),
            Step("user namespace", "write uid/gid maps", "map_own_ids",
                 (os.geteuid(), os.getegid())),
            Step("namespaces", "unshare namespaces", "unshare",
                 (linux.CLONE_NEWPID | linux.CLONE_NEWNS | OTHER_NAMESPACES,)),
            bring_up_loopback())


def body_view(view: BodyView, where: Where) -> tuple[Step, ...]:
    """The stage, /proc and /dev as for a container (as root, the spare's); then the host's
    tree read-only in place of a rootfs, its hidden paths covered, a private /tmp over the
    host's, the binds (into the hidden homes too, which are then sealed read-only), the same
    pivot_root."""
    binds = tuple((path, True) for path in view.read_only) \
        + tuple((path, False) for path in view.writable)
    stage = () if not where.rootless else (
        Step("stage", "make mounts private", "make_mounts_private"),
        Step("stage", "mount the stage", "mount_stage"),
        Step("stage", "pivot_root into the stage", "enter_stage"),
        *mount_proc_and_dev())
    etc_files = tuple(path for path in view.hidden if _etc_file(path))
    steps = [*stage,
             Step("root", "bind the host's tree read-only", "bind_host_root"),
             # first: the hiding mounts below it go on top of the /etc it mounts
             *((Step("root", "cover /etc's secret files by name", "cover_etc_files",
                     (etc_files,)),) if etc_files else ()),
             *(Step("root", f"hide {path}", "hide_host_path", (path,)) for path in view.hidden
               if path not in etc_files),
             Step("root", "mount /tmp over the host's", "mount_tmp_over_host",
                  (None, where.rootless))]
    for index, (path, read_only) in enumerate(binds):
        steps += [Step("root", f"open {path}", "open_host_path", (path,), f"bind {index}"),
                  Step("root", f"bind {path} {'read-only' if read_only else 'writable'}",
                       "bind_user_mount", (Ref(f"bind {index}"), path, read_only))]
    steps += [*(Step("root", f"seal {path}", "seal_hidden", (path,)) for path in view.hidden),
              Step("root", "move /dev", "move_into_root", ("/dev",)),
              Step("root", "move /proc", "move_into_root", ("/proc",)),
              Step("root", "close the host's paths", "close_fds",
                   tuple(Ref(f"bind {index}") for index in range(len(binds)))),
              # a BodyView has the fields these read: cwd, hostname, network
              *pivot_into_root(view),  # type: ignore[arg-type]
              *name_and_network(view, where)]  # type: ignore[arg-type]
    return tuple(steps)


def _etc_file(path: str) -> bool:
    """A hidden path that `cover_etc_files` covers: a file (not a directory, nor a symlink,
    which the body's mounts never follow) of the host's /etc, as the worker sees it."""
    return path.startswith("/etc/") and os.path.isfile(path) and not os.path.islink(path)


def services_inside(view: BodyView, relay: int | None) -> tuple[Step, ...]:
    """In the body's network namespace, once its loopback is up (as root, the body; without
    root, its init, which forks the body after): listeners at the services' addresses, handed
    to the relay. Before the test function runs, so that it finds them there."""
    if relay is None or not view.services:
        return ()
    return (Step("hostname and loopback", "listen at the services' addresses",
                 "hand_over_service_addresses", (relay, view.services, Ref("report"))),)


def body_confinement(view: BodyView, where: Where) -> tuple[Step, ...]:
    """As `confine`; as root, the user namespace is made here, last, mapping container root
    to our own uid alone: it owns none of the namespaces built as host root."""
    userns = () if where.rootless or not view.user_namespace else (
        Step("user namespace", "unshare the user namespace", "unshare", (linux.CLONE_NEWUSER,)),
        Step("user namespace", "write uid/gid maps", "map_own_ids",
             (os.geteuid(), os.getegid())))
    steps = (Step("rlimits", "close the worker's handles", "close_inherited_handles",
                  (Ref("report"),)),
             # fsize unbounded: the body writes to host paths (tmp_path), not to a layer
             Step("rlimits", "set rlimits", "set_rlimits",
                  (rlimits_with(view.security.rlimits), -1)),
             Step("rlimits", "join a new session keyring", "join_new_session_keyring"),
             *userns,
             Step("capabilities", "drop capabilities", "drop_capabilities",
                  (capability_mask(view.security.capabilities),)))
    if view.security.seccomp:
        steps += (install_seccomp(view.security.allow_syscalls),)
    return steps
