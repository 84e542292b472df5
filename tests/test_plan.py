"""The container's setup plan as a value: one ordered list, plain data that crosses a socket
whole, every action known to the executor, every slot saved before it is read. (That the plan
builds a working container is what every other test of a container shows.)"""

from __future__ import annotations

import json

import pytest

from pytest_minictr import Mount
from pytest_minictr.container import plan
from pytest_minictr.container.executor import Executor
from pytest_minictr.keywords import make_spec

# What a child knows before its first step (see container.child).
GIVEN_SLOTS = {"fds", "signal_proxy", "parent pidfd"}
ROOT = plan.Where(cgroup_procs=("/sys/fs/cgroup/x/cgroup.procs",), userns_fd=7,
                  host_ids=(1_000_000_000, 1_000_000_000))
ROOTLESS = plan.Where(rootless=True)
ROOTLESS_MAPPED = plan.Where(rootless=True, id_maps=(5, 6))


@pytest.fixture(params=["default", "mounts", "loosened",
                        pytest.param("host root", marks=pytest.mark.needs_root)])
def spec(request, tmp_path):
    keywords = {
        "default": {},
        "mounts": {"mounts": [Mount.bind(str(tmp_path), "/data"), Mount.tmpfs("/scratch")],
                   "layer": str(tmp_path / "layer"), "network": "none"},
        "loosened": {"seccomp": False, "capabilities": ["NET_RAW"], "rlimits": {"nofile": 64}},
        "host root": {"user": False},
    }[request.param]
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "layer").mkdir()
    return make_spec(tmp_path / "rootfs", ["sh", "-c", "true"], **keywords)


@pytest.mark.parametrize("where", [ROOT, ROOTLESS, ROOTLESS_MAPPED],
                         ids=["root", "rootless", "rootless-mapped"])
def test_the_setup_is_one_list_in_the_order_of_its_phases(spec, where):
    steps = plan.setup_plan(spec, where)
    assert steps == plan.prepared_ahead(where) + plan.completed_with(spec, where)
    # without root the user namespace comes first (it must own the others); else in order
    phases = [s.phase for s in steps if not (where.rootless and s.phase == "user namespace")]
    assert phases == sorted(phases, key=plan.PHASES.index)
    assert steps[-1].phase == "exec"
    assert [s.phase for s in plan.prepared_ahead(where)][-1] == "/proc and /dev"


@pytest.mark.parametrize("where", [ROOT, ROOTLESS], ids=["root", "rootless"])
def test_a_plan_is_plain_data_that_crosses_a_socket_whole(spec, where):
    for steps in (plan.setup_plan(spec, where),
                  plan.exec_plan(spec, ROOT, (3, None, 4, 5, None, 6, 8))):
        wire = plan.encode(steps)
        assert plan.encode(plan.decode(wire)) == wire
        assert [step.action for step in plan.decode(wire)] == [step.action for step in steps]
        assert json.loads(wire)  # JSON: what another executor, in another language, reads


@pytest.mark.parametrize("where", [ROOT, ROOTLESS_MAPPED], ids=["root", "rootless"])
def test_every_step_can_be_carried_out_and_reads_only_what_was_saved(spec, where):
    for steps in (plan.setup_plan(spec, where),
                  plan.exec_plan(spec, where, (3, None, None, None, None, None, 8))):
        saved = set(GIVEN_SLOTS)
        for step in steps:
            assert step.action in Executor().actions, step
            assert step.phase in plan.PHASES, step
            reads = {arg.slot for arg in step.args if isinstance(arg, plan.Ref)}
            assert reads <= saved, f"{step.name} reads {reads - saved} before it is saved"
            saved |= {step.saves} - {None}


def test_the_defences_are_where_the_spec_asks_for_them(spec):
    names = [step.name for step in plan.setup_plan(spec, ROOT)]
    assert ("install the seccomp filter" in names) == spec.security.seccomp
    assert ("enter the user namespace" in names) == spec.user_namespace
    assert ("idmap the rootfs" in names) == spec.user_namespace
    assert "drop capabilities" in names and "set rlimits" in names
    assert names.index("enter the user namespace" if spec.user_namespace
                       else "set rlimits") < names.index("drop capabilities")


def test_a_failing_step_is_named_with_its_phase():
    executor = Executor()
    step = plan.Step("layer", "open /no/such/rootfs", "chdir", ("/no/such/rootfs",))
    with pytest.raises(Exception) as raised:
        executor.carry_out(step)
    assert (raised.value.step, raised.value.phase, raised.value.errno) == (
        "open /no/such/rootfs", "layer", 2)
    assert str(raised.value).startswith("open /no/such/rootfs: No such file")


def test_a_plan_kept_encoded_gets_its_command_at_the_end(spec):
    head = plan.encode(plan.completed_with(spec, ROOT)[:-1])
    assert plan.encode_with(head, plan.run_command(spec)) == plan.encode(
        plan.completed_with(spec, ROOT))
