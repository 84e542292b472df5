"""A container's setup as a plan: one ordered list of named steps, built from the spec by the
launcher and carried out, step by step, in the container's child (`executor`).

The whole setup, in order (`setup_plan`; each step names the kernel rule or the attack that
puts it there, where it is built below):

    join cgroup → namespaces → stage → /proc and /dev      (prepared ahead of the spec)
    → layer → root → pivot_root → hostname and loopback
    → rlimits → user namespace → capabilities → seccomp → exec

A plan is a value: a tuple of `Step`s, each an action's name with plain arguments (str, int,
bool, None, tuples of them) and no closures, so that it can cross a socket to a spare init and
that an executor written in another language could carry it out. A value made by one step and
used by a later one (an fd the child opened, the layer's size) is kept in a named slot: the
step that makes it `saves` it, and a later step names it with a `Ref`.

As root, a spare init carries out the prefix that does not depend on the spec
(`prepared_ahead`) while it waits for one, then the rest (`completed_with`). Without root,
the user namespace must come first (it owns the others, and mounting /proc takes privilege
over the PID namespace), so the plan begins in a keeper process that makes the namespaces and
forks the init, which carries out the rest. `minictr doctor` rehearses this same plan, but its
last step, in a throwaway process (`doctor.rehearsal`). Another command joining a running
container follows `exec_plan`: the container's namespaces, then the same confinement steps.
A sandboxed test body's plan (`body_plan`) is made of these steps too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

from pytest_minictr.confinement import NETWORK_CAPABILITIES
from pytest_minictr.container import mounts, seccomp, security
from pytest_minictr.host import linux
from pytest_minictr.spec import ContainerSpec

PHASES = ("join cgroup", "namespaces", "stage", "/proc and /dev", "layer", "root", "pivot_root",
          "hostname and loopback", "rlimits", "user namespace", "capabilities", "seccomp",
          "exec")
# The namespaces of every container but PID and mount, which come with the fork and with the
# stage. CGROUP after the cgroup is joined: /proc/self/cgroup inside then shows "/" and
# nothing of the host's layout.
OTHER_NAMESPACES = (linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWNET
                    | linux.CLONE_NEWCGROUP)
# Joined by an exec helper: the user namespace first (without root it owns the others, and
# joining those takes its capabilities); the mount namespace last (it moves our root).
JOINED_NAMESPACES = (("user", linux.CLONE_NEWUSER), ("ipc", linux.CLONE_NEWIPC),
                     ("uts", linux.CLONE_NEWUTS), ("net", linux.CLONE_NEWNET),
                     ("cgroup", linux.CLONE_NEWCGROUP), ("pid_for_children", linux.CLONE_NEWPID),
                     ("mnt", linux.CLONE_NEWNS))


@dataclass(frozen=True)
class Ref:
    """An argument that is the value a previous step saved in slot `slot`."""

    slot: str


class Step(NamedTuple):
    """One setup step: `action` carried out with `args`; a failure is reported as `name`.
    (A named tuple, not a dataclass: a container's plan is some 25 of them, made for each
    start on the launcher's path, and JSON writes a tuple as it is: a third of the cost.)"""

    phase: str
    name: str
    action: str
    args: tuple[Any, ...] = ()
    saves: str | None = None


@dataclass(frozen=True)
class Where:
    """What the launcher knows of a container's setup besides its spec."""

    cgroup_procs: tuple[str, ...] = ()  # the cgroup.procs file of each hierarchy; () no cgroup
    userns_fd: int | None = None        # root: the user namespace container root enters last
    host_ids: tuple[int, int] = (0, 0)  # container root's uid and gid on the host
    rootless: bool = False              # not root: the plan starts in a keeper
    # Without root: the keeper's (ready, go) pipe ends, when the launcher maps its ids in full
    # (subordinate ids); None: the keeper maps our own uid alone.
    id_maps: tuple[int, int] | None = None
    # A pod's later container shares the network namespace of the pod's first (see
    # `launcher.pods`): its fd (as root, the slot the spare receives it in); without
    # root also the user namespace that owns it, which must be joined first.
    pod_netns: int | Ref | None = None
    pod_userns: int | None = None


def setup_plan(spec: ContainerSpec, where: Where) -> tuple[Step, ...]:
    """The whole setup of one container, in order."""
    return prepared_ahead(where) + completed_with(spec, where)


def prepared_ahead(where: Where) -> tuple[Step, ...]:
    """The steps that do not depend on the spec: a spare's, while it waits for one."""
    return (*join_cgroup(where), *enter_namespaces(where), *build_stage(where),
            *mount_proc_and_dev())


def completed_with(spec: ContainerSpec, where: Where) -> tuple[Step, ...]:
    """The rest of the setup, once the spec has come."""
    userns = spec.user_namespace and not where.rootless
    return (*renew_stage(where), *mount_layer(spec, where, userns), *build_root(spec),
            *pivot_into_root(spec), *name_and_network(spec, where),
            *confine(spec, where, userns), *open_terminal(spec),
            run_command(spec))


def run_command(spec: ContainerSpec) -> Step:
    """The last step, the only one that depends on the command and its environment."""
    # Only fds 0-2 reach the command (CVE-2024-21626: a leaked fd of a host directory is a
    # way out of any root), in a new session (no terminal of ours to push input into:
    # CVE-2017-5226), with default signal dispositions.
    return Step("exec", "run the command", "run_command_as_init",
                (spec.argv, spec.env, Ref("fds"), Ref("signal_proxy"), spec.terminal))


def exec_plan(spec: ContainerSpec, where: Where, namespaces: tuple[int | None, ...]
              ) -> tuple[Step, ...]:
    """Another command in a running container: into its cgroup and namespaces (`namespaces`:
    fds in JOINED_NAMESPACES order, opened by the launcher; None for one we share), then
    confined exactly as the container's own command was."""
    userns = spec.user_namespace and where.userns_fd is not None
    joined = tuple(Step("namespaces", f"join the container's {name} namespace", "setns",
                        (fd, nstype))
                   for (name, nstype), fd in zip(JOINED_NAMESPACES, namespaces, strict=True)
                   if fd is not None)
    return (*join_cgroup(where), *joined,
            Step("pivot_root", f"chdir to cwd={spec.cwd!r}", "chdir", (spec.cwd,)),
            Step("layer", "measure the layer", "measure_filesystem", ("/",), saves="layer size"),
            *confine(spec, where, userns), *open_terminal(spec),
            Step("exec", "run the command", "run_command_beside",
                 (spec.argv, spec.env, Ref("fds"), spec.terminal)))


# --- the steps, in the order the plan takes them ------------------------------------------------

def join_cgroup(where: Where) -> tuple[Step, ...]:
    # First, before any fork or unshare: no moment of the container runs unlimited. "0" is
    # the writer itself, whatever PID namespace it sees itself in.
    return tuple(Step("join cgroup", "join cgroup", "write_file", (procs, "0"))
                 for procs in where.cgroup_procs)


def enter_namespaces(where: Where) -> tuple[Step, ...]:
    if not where.rootless:
        # As root the PID namespace came with the fork (a spare is PID 1 of its own).
        return (Step("namespaces", "unshare namespaces", "unshare", (OTHER_NAMESPACES,)),
                # Low ports and ping for every uid inside: root inside is not root over this
                # network namespace (the host's user namespace owns it), as with Docker.
                Step("namespaces", "open low ports and ping", "open_low_ports_and_ping"),
                bring_up_loopback())
    if where.pod_userns is not None:
        return join_pod(where)
    map_ids = (Step("user namespace", "write uid/gid maps", "map_own_ids",
                    (os.geteuid(), os.getegid())) if where.id_maps is None
               else Step("user namespace", "write uid/gid maps", "wait_for_id_maps",
                         where.id_maps))
    return (Step("user namespace", "unshare the user namespace", "unshare",
                 (linux.CLONE_NEWUSER,)),
            map_ids,
            Step("namespaces", "unshare namespaces", "unshare",
                 (linux.CLONE_NEWPID | linux.CLONE_NEWNS | OTHER_NAMESPACES,)),
            bring_up_loopback(),
            # The keeper stays outside the new PID namespace, holding it and the others;
            # its child is PID 1 there, and carries out the rest of the plan.
            Step("namespaces", "fork the init", "fork_init_under_keeper", (Ref("fds"),),
                 saves="parent pidfd"),  # the keeper's, in the init
            # (as root, a spare inherits its signal proxy from the zygote, made once)
            Step("namespaces", "forward signals to the command", "install_signal_proxy",
                 saves="signal_proxy"))


def bring_up_loopback() -> Step:
    # With the network namespace, so that a spare has done it before its spec comes: the
    # kernel's work for it is then off the start's path. network="none"
    # takes it down again (see linux.take_loopback_down).
    return Step("namespaces", "bring up loopback", "set_link_up", ("lo",))


def join_pod(where: Where) -> tuple[Step, ...]:
    """Without root, a pod's later container: the pod's user namespace (it owns the network
    namespace; joining one takes CAP_SYS_ADMIN over it, which only its own user namespace
    gives us), new PID, mount, UTS, IPC and cgroup namespaces of its own, the pod's network
    namespace. Its containers share their user namespace, as a Kubernetes pod does."""
    return (Step("user namespace", "join the pod's user namespace", "setns",
                 (where.pod_userns, linux.CLONE_NEWUSER)),
            Step("namespaces", "unshare namespaces", "unshare",
                 (linux.CLONE_NEWPID | linux.CLONE_NEWNS
                  | (OTHER_NAMESPACES & ~linux.CLONE_NEWNET),)),
            Step("namespaces", "join the pod's network namespace", "setns",
                 (where.pod_netns, linux.CLONE_NEWNET)),
            Step("namespaces", "fork the init", "fork_init_under_keeper", (Ref("fds"),),
                 saves="parent pidfd"),  # the keeper's, in the init
            Step("namespaces", "forward signals to the command", "install_signal_proxy",
                 saves="signal_proxy"))


def build_stage(where: Where) -> tuple[Step, ...]:
    """See `mounts`: a tmpfs of our own holding the new root, with the host's tree under it."""
    unshare = () if where.rootless else (  # the keeper unshared it with the rest
        Step("stage", "watch the host's mounts", "watch_host_mounts", saves="host mounts"),
        Step("stage", "unshare the mount namespace", "unshare", (linux.CLONE_NEWNS,)))
    return (*unshare,
            # Not dumpable: /proc/1/fd and /proc/1/mem are then closed to a command without
            # CAP_SYS_PTRACE over us (our pipes to the launcher are behind them).
            Step("stage", "close /proc/1 to the command", "set_dumpable", (False,)),
            # systemd hosts mount / shared: without this every mount below would propagate
            # back to the host.
            Step("stage", "make mounts private", "make_mounts_private"),
            # The writable layer lives in this tmpfs: charged to the container's memory
            # cgroup, gone with the namespace, no host temp dir to leak.
            Step("stage", "mount the stage", "mount_stage"),
            # bubblewrap's way: the host's tree under /oldroot, reachable by us until the
            # container's own pivot_root detaches it.
            Step("stage", "pivot_root into the stage", "enter_stage"))


def mount_proc_and_dev() -> tuple[Step, ...]:
    return (Step("/proc and /dev", "mount /proc", "mount_proc"),
            # only harmless nodes, bound from the host: mknod is not the container's to use
            Step("/proc and /dev", "mount /dev", "mount_dev",
                 (mounts.DEV_NODES, mounts.DEV_LINKS, mounts.DEVICE_BIND_FLAGS)),
            # runc's masks: kcore and kallsyms (kernel memory), keys, timers; and the host
            # kernel's knobs read-only (core_pattern runs a program as host root: the
            # classic escape)
            Step("/proc and /dev", "mask /proc", "mask_proc",
                 (mounts.PROC_MASKED, mounts.PROC_READ_ONLY)))


def renew_stage(where: Where) -> tuple[Step, ...]:
    if where.rootless:
        return ()
    # A spare copied the host's mount table before its spec came; a mount made on the host
    # since (a filesystem on the rootfs' path) would be missing from the copy, and the layer
    # and the user's mounts are opened through it. (Part of "layer": what it carries out again
    # are the stage's own steps, each failing under its own phase.)
    return (Step("layer", "renew a stale copy of the host's mounts", "renew_stage_if_stale",
                 (Ref("host mounts"),)),)


def mount_layer(spec: ContainerSpec, where: Where, userns: bool) -> tuple[Step, ...]:
    """The base rootfs (or an image's layers), read-only, under the writable layer. Host
    paths are opened as O_PATH fds under the stage's /oldroot: the kernel takes them as
    /proc/self/fd/N, which spares us escaping ',' and ':' in overlay options."""
    bases = lower_slots(spec)
    steps = [*(Step("layer", f"open {path}", "open_host_path", (path,), slot)
               for path, slot in zip(spec.lower_dirs, bases, strict=True)),
             Step("layer", f"open {spec.layer}", "open_host_path", (spec.layer,), "layer")
             if spec.layer is not None else  # the stage itself holds the writable layer
             Step("layer", "no kept layer", "nothing", saves="layer"),
             # Two overlays on one upper dir at once corrupt each other.
             Step("layer", "lock the layer", "lock_layer", (Ref("layer"),), "layer lock"),
             *([] if spec.layer is None else [
                 Step("layer", "create the layer's dirs", "make_layer_dirs", (Ref("layer"),))]),
             Step("layer", "size the writable layer", "size_stage", (spec.layer_size,)),
             Step("layer", "measure the layer", "measure_layer", (Ref("layer"),), "layer size")]
    lowers = [Ref(slot) for slot in bases]
    if userns:
        # Host root's files read as container root's, so that it can write over them in
        # the layer; and the layer's top is container root's own. (Each layer of an image
        # is a mount of its own to idmap.)
        lowers = [Ref(f"lower {index}") for index in range(len(bases))]
        steps += [*(Step("layer", "idmap the rootfs", "idmapped",
                         (Ref(base), where.userns_fd, where.host_ids[0]), lower.slot)
                    for base, lower in zip(bases, lowers, strict=True)),
                  Step("layer", "chown the layer", "chown_layer", (Ref("layer"), *where.host_ids))]
    # trusted.* xattrs are out of reach in a user namespace (kernel >= 5.11 needs userxattr).
    # overlayfs takes lowerdir top first; an image lists its layers bottom first.
    steps.append(Step("layer", "mount overlay of the rootfs", "mount_overlay",
                      (Ref("layer"), where.rootless, *reversed(lowers))))
    return tuple(steps)


def lower_slots(spec: ContainerSpec) -> tuple[str, ...]:
    """The slots of the lower dirs' fds: "rootfs" for a rootfs of one directory."""
    if len(spec.lower_dirs) == 1:
        return ("rootfs",)
    return tuple(f"rootfs {index}" for index in range(len(spec.lower_dirs)))


def build_root(spec: ContainerSpec) -> tuple[Step, ...]:
    # Until the last pivot_root, paths resolve against the stage, which holds the host's
    # tree: a mount point may not lead through a symlink of the image (it would steer the
    # mount onto the host; runc's CVE-2021-30465 is that race). mounts._mount_point refuses.
    steps = [Step("root", "move /dev", "move_into_root", ("/dev",)),
             Step("root", "mount /tmp", "mount_tmp", (spec.layer_size,)),
             # Docker's: servers resolve their own hostname (RabbitMQ, Java's getLocalHost).
             # Bound over the image's files, which stay as they are (the user's mounts below
             # go over these).
             *(Step("root", f"bind {path}", "bind_text_file", (text, path))
               for path, text in etc_files(spec.hostname))]
    sources = []
    for index, mount in enumerate(spec.mounts):
        if mount.source is None:
            steps.append(Step("root", f"mount tmpfs on {mount.target}", "mount_user_tmpfs",
                              (mount.target, mount.size)))
            continue
        sources.append(Ref(f"source {index}"))
        steps += [Step("root", f"open {mount.source}", "open_host_path", (mount.source,),
                       sources[-1].slot),
                  Step("root", f"bind {mount.source} on {mount.target}", "bind_user_mount",
                       (sources[-1], mount.target, mount.read_only))]
    # last: until here, /proc/self/fd/N named our fds (the user's mounts use it)
    steps.append(Step("root", "move /proc", "move_into_root", ("/proc",)))
    if spec.read_only:  # last of the mounts: their mount points may have to be made first
        steps.append(Step("root", "make the root read-only", "make_root_read_only"))
    steps += [Step("root", "close the host's paths", "close_fds",
                   (*map(Ref, lower_slots(spec)), Ref("layer"), *sources))]
    return tuple(steps)


def etc_files(hostname: str) -> tuple[tuple[str, str], ...]:
    return (("/etc/hostname", f"{hostname}\n"),
            ("/etc/hosts", f"127.0.0.1\tlocalhost {hostname}\n"
                           f"::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"))


def pivot_into_root(spec: ContainerSpec) -> tuple[Step, ...]:
    # The old root (stage and host) is detached, so no path leads back to the host: the
    # chroot ".." escape has nothing to climb to.
    return (Step("pivot_root", "pivot_root", "enter_root"),
            Step("pivot_root", f"chdir to cwd={spec.cwd!r}", "chdir", (spec.cwd,)))


def name_and_network(spec: ContainerSpec, where: Where) -> tuple[Step, ...]:
    steps = [Step("hostname and loopback", "set hostname", "set_hostname", (spec.hostname,))]
    if where.pod_netns is not None:
        if not where.rootless:  # (without root, the keeper joined it: see join_pod)
            # As host root still: the pod's first container made it as host root too.
            steps.append(Step("hostname and loopback", "join the pod's network namespace",
                              "setns", (where.pod_netns, linux.CLONE_NEWNET)))
    elif spec.network == "none":  # (the loopback came up with the namespace)
        steps.append(Step("hostname and loopback", "take loopback down", "take_loopback_down"))
    return tuple(steps)


def confine(spec: ContainerSpec, where: Where, userns: bool) -> tuple[Step, ...]:
    """The last steps before the command, in the kernel's order (see `security`)."""
    # As host root still: raising a hard limit takes CAP_SYS_RESOURCE. No core dumps (a
    # dump lands in the layer, or in a host pipe handler that core_pattern names).
    steps = [Step("rlimits", "set rlimits", "set_rlimits",
                  (security.rlimits_with(spec.security.rlimits), Ref("layer size"))),
             # while still host root: the keyring is host root's, out of the container's reach
             Step("rlimits", "join a new session keyring", "join_new_session_keyring")]
    if userns:
        # Root inside is not root outside. Entered last, so that it owns none of the
        # namespaces built as host root: whatever capabilities it keeps, it cannot remount,
        # unmount, rename the host or reconfigure the network.
        steps += [Step("user namespace", "enter the user namespace", "enter_user_namespace",
                       (where.userns_fd,)),
                  # the id switch disarmed PR_SET_PDEATHSIG (a kernel rule)
                  Step("user namespace", "arm the parent death signal",
                       "arm_parent_death_signal", (Ref("parent pidfd"),))]
        if NETWORK_CAPABILITIES & set(spec.security.capabilities):
            steps.append(Step("user namespace", "make a network namespace of its own",
                              "own_network", (spec.network,)))
    # runc's defaults less MKNOD, NET_RAW (forged packets), SYS_CHROOT (the chroot ".."
    # escape), SETPCAP, SETFCAP, AUDIT_WRITE; the bounding set too, and no_new_privs, after
    # which a setuid binary gains nothing.
    steps.append(Step("capabilities", "drop capabilities", "drop_capabilities",
                      (security.capability_mask(spec.security.capabilities),)))
    if spec.run_as not in (None, (0, 0)):
        # Docker's --user, for the init too: it and the command stay one uid, as they are
        # as container root. After the bounding set went (CAP_SETUID and CAP_SETGID are
        # kept), before seccomp. Leaving uid 0 empties the capability sets (a kernel rule)
        # and disarms the parent death signal, armed again.
        uid, gid = spec.run_as
        steps += [Step("capabilities", f"switch to uid {uid}, gid {gid}", "switch_ids",
                       (uid, gid)),
                  Step("capabilities", "arm the parent death signal",
                       "arm_parent_death_signal", (Ref("parent pidfd"),))]
    if spec.security.seccomp:
        # last: it needs no_new_privs, and would refuse the calls before it (see `seccomp`:
        # keyrings, modules, bpf, io_uring, mounts, new user namespaces, TIOCSTI...)
        steps.append(install_seccomp(spec.security.allow_syscalls))
    return tuple(steps)


def open_terminal(spec: ContainerSpec) -> tuple[Step, ...]:
    # The pty comes from the container's own devpts (see init.open_terminal), opened by
    # container root (it owns the slave), after seccomp: the master leaves at once.
    return (Step("exec", "open the terminal", "open_terminal", (Ref("fds"),)),) \
        if spec.terminal else ()


def install_seccomp(allowed: tuple[str, ...]) -> Step:
    """The filter less `allowed`; its program in hex too, the native core's argument."""
    return Step("seccomp", "install the seccomp filter", "install_seccomp_filter",
                (allowed, seccomp.host_filter_hex(allowed)))


def encode(steps: tuple[Step, ...]) -> bytes:
    """The plan as JSON, for the socket to a spare: each step a list, a Ref {"ref": slot}."""
    return json.dumps(steps, separators=(",", ":"), default=_ref_as_json).encode()


def encode_with(encoded: bytes, step: Step) -> bytes:
    """An encoded plan with one more step at its end (its JSON list closed again)."""
    return encoded[:-1] + b"," + encode((step,))[1:]


def decode(data: bytes) -> tuple[Step, ...]:
    """The plan `encode` wrote. Tuples among the arguments come back as lists."""
    return tuple(Step._make(step) for step in json.loads(data, object_hook=_ref_from_json))


def _ref_as_json(value: Any) -> dict[str, str]:
    if not isinstance(value, Ref):
        raise TypeError(f"a plan holds plain values and Refs, not {value!r}")
    return {"ref": value.slot}


def _ref_from_json(value: dict[str, str]) -> Ref:
    return Ref(value["ref"])

