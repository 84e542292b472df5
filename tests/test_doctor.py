"""`minictr doctor`: against the real host (root, an unprivileged user, and a user namespace
whose sysctl forbids more of them), and against simulated hosts for the explanations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_minictr import doctor
from pytest_minictr.doctor.checks import Finding
from pytest_minictr.doctor.host import Host, Rehearsal

pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def minictr_doctor(*args: str, prefix: tuple[str, ...] = (), python: str = sys.executable,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, python, "-m", "pytest_minictr", "doctor", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root")


def test_this_host_is_ready_and_every_check_passes():
    needs_root()
    done = minictr_doctor()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("minictr ") and "doctor: root" in lines[0]
    for name in ("kernel", "user namespaces", "mount namespace", "overlayfs", "/proc",
                 "pivot_root", "seccomp filter", "rootfs cache", "ldd"):
        assert any(line.startswith(f"✓ {name}:") for line in lines), (name, done.stdout)
    assert lines[-1] == "the default container works here"


def test_json_has_every_check_and_the_verdict():
    needs_root()
    report = json.loads(minictr_doctor("--json").stdout)
    assert report["ready"] is True
    names = [check["name"] for check in report["checks"]]
    assert {"kernel", "user namespaces", "overlayfs", "/proc", "pivot_root", "cgroups"} \
        <= set(names)
    assert set(report["checks"][0]) == {"name", "ok", "detail", "fix", "needed", "tried"}


def test_an_unprivileged_user_is_told_what_rootless_gets():
    needs_root()
    if not (shutil.which("setpriv") and Path("/usr/bin/python3").exists()):
        pytest.skip("needs setpriv and /usr/bin/python3 (an interpreter any user may run)")
    done = minictr_doctor(
        prefix=("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
        python="/usr/bin/python3", env={"HOME": "/nonexistent", "MINICTR_CACHE_DIR": "/tmp"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ user namespaces: nobody can make them (root inside, your own uid outside)" \
        in done.stdout
    cgroups = next(line for line in done.stdout.splitlines() if "cgroups:" in line)
    assert cgroups.startswith(("- cgroups", "✓ cgroups"))  # limits are optional


def test_a_host_that_forbids_user_namespaces_gets_the_sysctl_and_exit_1():
    """For real: in a user namespace whose user.max_user_namespaces is 0 (the limit is per
    namespace), the rehearsal's own user namespace is refused."""
    needs_root()
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) (util-linux)")
    script = ("echo 0 > /proc/sys/user/max_user_namespaces && "
              f"exec {sys.executable} -m pytest_minictr doctor")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "✗ user namespaces: root cannot make one (unshare(CLONE_NEWUSER): No space left " \
           "on device): the sysctl user.max_user_namespaces is 0" in done.stdout
    assert "    fix: sudo sysctl -w user.max_user_namespaces=15000" in done.stdout
    assert "? overlayfs: not tried: user namespace failed" in done.stdout


# --- simulated hosts: the explanations ---------------------------------------------------------

class SimulatedHost(Host):
    """A host as a test describes it: files, euid, kernel, programs, and how the rehearsal
    went. Anything not described is what a healthy rootless host would say."""

    def __init__(self, files=None, euid=1000, kernel="6.8.0-45-generic", rehearsal=None,
                 programs=("ldd",), cache_writable=True, cgroups=("v2", ""), env=None):
        self.files, self._euid, self._kernel = files or {}, euid, kernel
        self.env = env or {}
        self._rehearsal = rehearsal or Rehearsal()
        self.programs, self.cache_writable, self._cgroups = programs, cache_writable, cgroups

    def euid(self):
        return self._euid

    def user(self):
        return "alice" if self._euid else "root"

    def kernel(self):
        return self._kernel

    def machine(self):
        return "x86_64"

    def environ(self, name):
        return self.env.get(name)

    def read(self, path):
        return self.files.get(path)

    def which(self, name):
        return f"/usr/bin/{name}" if name in self.programs else None

    def cache_dir(self):
        return Path("/home/alice/.cache/minictr")

    def writable(self, path):
        return self.cache_writable

    def cgroups(self):
        return self._cgroups

    def rehearse(self):
        return self._rehearsal


REFUSED = Rehearsal("user namespace", "Operation not permitted")


def finding(findings: list[Finding], name: str) -> Finding:
    return next(f for f in findings if f.name == name)


@pytest.mark.parametrize("files, reason, fix", [
    ({"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1\n"},
     "AppArmor (kernel.apparmor_restrict_unprivileged_userns) keeps unprivileged users from "
     "them (Ubuntu 23.10 and later)",
     "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
    ({"/proc/sys/kernel/unprivileged_userns_clone": "0\n"},
     "the sysctl kernel.unprivileged_userns_clone is 0 (Debian's switch)",
     "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
    ({"/proc/sys/user/max_user_namespaces": "0\n"},
     "the sysctl user.max_user_namespaces is 0", "sudo sysctl -w user.max_user_namespaces="),
    ({"/.dockerenv": ""}, "this runs inside a container whose seccomp profile",
     "--security-opt seccomp=unconfined"),
    ({}, "the kernel refused, for a reason it did not name", "dmesg"),
], ids=["apparmor", "debian-sysctl", "max-zero", "in-docker", "unknown"])
def test_a_refused_user_namespace_is_explained_with_its_fix(files, reason, fix):
    findings = doctor.examine(SimulatedHost(files=files, rehearsal=REFUSED))
    users = finding(findings, "user namespaces")
    assert not users.ok and users.needed
    assert users.detail == f"alice cannot make one (Operation not permitted): {reason}" \
        or users.detail.startswith(f"alice cannot make one (Operation not permitted): {reason}")
    assert fix in users.fix
    assert not doctor.ready(findings)
    assert not finding(findings, "overlayfs").tried
    assert doctor.problem_text(findings).startswith("user namespaces: alice cannot make one")


def test_the_quick_look_reads_the_sysctls_without_trying():
    quick = doctor.examine(SimulatedHost(
        files={"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1\n"},
        rehearsal=Rehearsal("overlayfs", "never run")), rehearse=False)
    assert [f.name for f in quick] == ["kernel", "user namespaces", "cgroups", "setup path"]
    assert not finding(quick, "user namespaces").ok
    # inside a container, nothing says user namespaces are refused until one is
    assert finding(doctor.examine(SimulatedHost(files={"/.dockerenv": ""}), rehearse=False),
                   "user namespaces").ok


@pytest.mark.parametrize("host, name, fix", [
    (SimulatedHost(kernel="5.4.0-150-generic"), "kernel", "upgrade to Linux 5.11 or later"),
    (SimulatedHost(programs=()), "ldd", "install libc-bin"),
    (SimulatedHost(cache_writable=False), "rootfs cache", "set MINICTR_CACHE_DIR"),
    (SimulatedHost(rehearsal=Rehearsal("overlayfs", "No such device")), "overlayfs",
     "modprobe overlay"),
], ids=["old-kernel", "no-ldd", "cache", "overlay"])
def test_each_needed_failure_stops_the_default_container(host, name, fix):
    findings = doctor.examine(host)
    assert fix in finding(findings, name).fix and not doctor.ready(findings)


def test_what_is_not_needed_does_not_stop_it():
    host = SimulatedHost(cgroups=(None, "cgroup v1: no delegation; run as root"),
                         programs=("ldd",))
    findings = doctor.examine(host)
    cgroups, ids = finding(findings, "cgroups"), finding(findings, "id mapping")
    assert not cgroups.ok and not cgroups.needed and cgroups.fix == "run as root"
    assert not ids.ok and "usermod --add-subuids" in ids.fix
    assert doctor.ready(findings) and doctor.problem_text(findings) is None
    assert doctor.main(False, host, out=lambda text: None) == 0


def test_full_id_mapping_needs_the_helpers_and_ranges():
    host = SimulatedHost(programs=("ldd", "newuidmap", "newgidmap"), files={
        "/etc/subuid": "alice:100000:65536\n", "/etc/subgid": "alice:100000:65536\n"})
    assert finding(doctor.examine(host), "id mapping").ok


def test_the_id_mapping_fix_suggests_a_range_no_account_has():
    taken = "bob:100000:65536\ncarol:165536:65536\n"
    host = SimulatedHost(programs=("ldd", "newuidmap", "newgidmap"), files={
        "/etc/subuid": taken, "/etc/subgid": taken + "dave:300000:1000\n"})
    ids = finding(doctor.examine(host), "id mapping")
    assert not ids.ok and ids.fix == ("sudo usermod --add-subuids 301000-366535 "
                                      "--add-subgids 301000-366535 alice")


def test_a_user_with_ranges_is_told_only_what_is_missing():
    mine = "alice:231072:65536\n"
    host = SimulatedHost(programs=("ldd",), files={"/etc/subuid": mine, "/etc/subgid": mine})
    ids = finding(doctor.examine(host), "id mapping")
    assert ids.detail == "single uid: root only inside (missing: newuidmap, newgidmap)"
    assert ids.fix == "sudo apt install uidmap"
    only_gid = SimulatedHost(programs=("ldd", "newuidmap", "newgidmap"),
                             files={"/etc/subuid": mine})
    assert finding(doctor.examine(only_gid), "id mapping").fix == \
        "sudo usermod --add-subgids 296608-362143 alice"


def test_the_plugin_header_is_doctors_quick_look(pytester):
    """The header's facts are doctor's quick look; for real, on this host."""
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    quick = doctor.examine(rehearse=False)
    result.stdout.fnmatch_lines([f"minictr *: {doctor.header(quick)}, rootfs *"])


PLUGIN_TEST = textwrap.dedent("""
    def test_needs_one(container):
        container.run("true")
""")


@pytest.mark.parametrize("policy, outcome", [("fail", "1 error"), ("skip", "1 skipped")])
def test_where_containers_cannot_run_the_plugin_says_what_doctor_says(tmp_path, policy,
                                                                        outcome):
    needs_root()
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) (util-linux)")
    (tmp_path / "test_x.py").write_text(PLUGIN_TEST)
    script = ("echo 0 > /proc/sys/user/max_user_namespaces && "
              f"exec {sys.executable} -m pytest -p no:cacheprovider -rs "
              f"--minictr-unavailable={policy} test_x.py")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert outcome in done.stdout and "During handling" not in done.stdout, done.stdout
    assert "user namespaces: root cannot make one (unshare(CLONE_NEWUSER): No space left on " \
           "device): the sysctl user.max_user_namespaces is 0 (fix: sudo sysctl -w " \
           "user.max_user_namespaces=15000" in done.stdout.replace("\n", "")


# --- CI runners and containers: the place is named with the change its owner makes --------------

APPARMOR = {"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1\n"}
NO_DELEGATION = ("v2", "cgroup v2: /sys/fs/cgroup/user.slice is not yours; run as root")


@pytest.mark.parametrize("host, line, fix", [
    (SimulatedHost(env={"GITHUB_ACTIONS": "true"}, files=APPARMOR, rehearsal=REFUSED,
                   cgroups=NO_DELEGATION),
     "- this host: GitHub Actions runner (GITHUB_ACTIONS=true, "
     "kernel.apparmor_restrict_unprivileged_userns=1)",
     "add a step before the tests: "
     "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`"),
    (SimulatedHost(env={"GITLAB_CI": "true"}, files={"/.dockerenv": ""}, rehearsal=REFUSED),
     "- this host: GitLab CI job in a container (Docker executor) (GITLAB_CI=true, /.dockerenv)",
     "`[runners.docker] privileged = true`"),
    (SimulatedHost(files={"/.dockerenv": ""}, euid=0,
                   rehearsal=Rehearsal("/proc", "Operation not permitted")),
     "- this host: a container: Docker, Podman or Docker-in-Docker (/.dockerenv)",
     "--security-opt systempaths=unconfined"),
    (SimulatedHost(files={"/run/.containerenv": ""}, euid=0, cgroups=("v2", "read-only; x")),
     "- this host: a container: Docker, Podman or Docker-in-Docker (/run/.containerenv)",
     "`--privileged`"),
], ids=["github-apparmor", "gitlab-docker", "dind-proc", "podman-no-limits"])
def test_a_ci_runner_or_container_is_named_with_its_fix(host, line, fix):
    text = doctor.render(doctor.examine(host), host)
    lines = text.splitlines()
    assert line in lines, text
    assert lines[lines.index(line) + 1].startswith("    fix: ")
    assert fix in lines[lines.index(line) + 1], text


@pytest.mark.parametrize("host, line", [
    (SimulatedHost(env={"GITHUB_ACTIONS": "true"}, euid=0),
     "✓ this host: GitHub Actions runner (GITHUB_ACTIONS=true)"),
    (SimulatedHost(env={"GITLAB_CI": "true"}), "✓ this host: GitLab CI job (shell executor) "
                                               "(GITLAB_CI=true)"),
], ids=["github-root", "gitlab-shell"])
def test_a_ci_runner_where_all_works_is_named_without_a_fix(host, line):
    lines = doctor.render(doctor.examine(host), host).splitlines()
    assert line in lines
    assert not lines[lines.index(line) + 1].startswith("    fix:")


def test_a_workstation_is_no_place_to_name():
    assert all(f.name != "this host" for f in doctor.examine(SimulatedHost()))


def test_the_place_comes_from_the_real_environment():
    """For real: doctor as a process, told by its environment that it runs a GitLab job."""
    needs_root()
    done = minictr_doctor(env={"GITLAB_CI": "true"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("✓ this host: GitLab CI job") for line in
               done.stdout.splitlines()), done.stdout
