"""Carries out a setup plan (see `plan`) in this process, step by step, in Python.

Each action is a function of its step's arguments; a value a step `saves` goes into a slot
that later steps read through a `Ref`. An OSError becomes a ContainerSetupError that names
the step and its errno, which the child sends to the launcher on its setup pipe; a step that
knows better raises its own ContainerSetupError.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from pytest_minictr.container import body_mounts, init, mounts, network, security, userns
from pytest_minictr.container.plan import Ref, Step
from pytest_minictr.errors import ContainerSetupError
from pytest_minictr.host import linux

# What each action of a plan does here.
ACTIONS: dict[str, Callable[..., Any]] = {
    "write_file": linux.write_file,
    "unshare": linux.unshare,
    "setns": linux.setns,
    "set_dumpable": linux.set_dumpable,
    "set_link_up": linux.set_link_up,
    "take_loopback_down": linux.take_loopback_down,
    "set_hostname": socket.sethostname,
    "chdir": os.chdir,
    "nothing": lambda: None,
    "open_low_ports_and_ping": network.open_low_ports_and_ping,
    "own_network": network.own_network,
    "hand_over_service_addresses": network.hand_over_service_addresses,
    "map_own_ids": userns.map_own_ids,
    "wait_for_id_maps": userns.wait_for_id_maps,
    "fork_init_under_keeper": userns.fork_init_under_keeper,
    "enter_user_namespace": userns.enter_user_namespace,
    "arm_parent_death_signal": init.arm_parent_death_signal,
    "install_signal_proxy": init.SignalProxy,
    "watch_host_mounts": mounts.HostMountWatch,
    "make_mounts_private": mounts.make_mounts_private,
    "mount_stage": mounts.mount_stage,
    "enter_stage": mounts.enter_stage,
    "mount_proc": mounts.mount_proc,
    "mount_dev": mounts.mount_dev,
    "mask_proc": mounts.mask_proc,
    "open_host_path": mounts.open_host_path,
    "lock_layer": mounts.lock_layer,
    "size_stage": mounts.size_stage,
    "measure_layer": mounts.measure_layer,
    "measure_filesystem": mounts.measure_filesystem,
    "idmapped": mounts.idmapped,
    "make_layer_dirs": mounts.make_layer_dirs,
    "chown_layer": mounts.chown_layer,
    "mount_overlay": mounts.mount_overlay,
    "bind_text_file": mounts.bind_text_file,
    "bind_host_root": mounts.bind_host_root,
    "cover_etc_files": body_mounts.cover_etc_files,
    "hide_host_path": body_mounts.hide_host_path,
    "seal_hidden": body_mounts.seal_hidden,
    "mount_tmp_over_host": body_mounts.mount_tmp_over_host,
    "move_into_root": mounts.move_into_root,
    "mount_tmp": mounts.mount_tmp,
    "make_root_read_only": mounts.make_root_read_only,
    "mount_user_tmpfs": mounts.mount_user_tmpfs,
    "bind_user_mount": mounts.bind_user_mount,
    "close_fds": mounts.close_fds,
    "enter_root": mounts.enter_root,
    "close_inherited_handles": security.close_inherited_handles,
    "set_rlimits": security.set_rlimits,
    "join_new_session_keyring": linux.join_new_session_keyring,
    "drop_capabilities": security.drop_capabilities,
    "switch_ids": security.switch_ids,
    "install_seccomp_filter": security.install_seccomp_filter,
    "open_terminal": init.open_terminal,
    "run_command_as_init": init.run_command_as_init,
    "run_command_beside": init.run_command_beside,
}


class Executor:
    """Runs plan steps in order, keeping what they save. `slots`: values known before the
    first step (the child's descriptors, its parent's pidfd, the signal proxy)."""

    def __init__(self, **slots: Any):
        self.slots = slots
        self.done: list[Step] = []
        # the one action about the plan itself: it carries out again steps already done
        self.actions = {**ACTIONS, "renew_stage_if_stale": self._renew_stage_if_stale}

    def run(self, steps: tuple[Step, ...]) -> None:
        for step in steps:
            self.carry_out(step)

    def carry_out(self, step: Step) -> None:
        args = [self.slots[arg.slot] if type(arg) is Ref else arg for arg in step.args]
        try:
            result = self.actions[step.action](*args)
        except OSError as error:
            raise ContainerSetupError(f"{step.name}: {error.strerror or error}", step.name,
                                      error.errno, step.phase) from None
        except ContainerSetupError as error:
            error.step = error.step or step.name
            error.phase = error.phase or step.phase
            raise
        if step.saves is not None:
            self.slots[step.saves] = result
        self.done.append(step)

    def _renew_stage_if_stale(self, watch: mounts.HostMountWatch) -> None:
        """If the host's mounts changed since the stage copied them, go back to the host's
        mount namespace and carry out the stage's steps again: a fresh copy."""
        stale = watch.changed()
        if stale:
            watch.go_back()
            again = [step for step in self.done
                     if step.phase in ("stage", "/proc and /dev") and step.saves is None]
            for step in again:
                self.carry_out(step)
        watch.close()  # a way back to the host's mounts has no place in a container's init
