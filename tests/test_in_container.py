"""The Kubernetes-pod cases, for real: the runner inside a runc container.

A JupyterHub-on-Kubernetes kernel runs inside a container. Each case starts a
plain runc container from the empty scratch image with the host's system
directories (hence ``runsc`` and ``/usr/bin/python3``) bound read-only and a
copy of the package on ``PYTHONPATH``, runs ``INNER`` in it, and checks the one
JSON document it prints. See ``tests/support/containers.py`` for the harness.

What each container grants mirrors a pod: default capabilities and seccomp
(unprivileged); CAP_SYS_ADMIN + CAP_SYS_PTRACE with seccomp/apparmor unconfined
(what a securityContext can grant); the same for an ordinary user (``jovyan``).
"""

from __future__ import annotations

import os
import platform
import shutil

import pytest
from support import containers

GVISOR_RELEASE = "4.4.0"
RUNSC = "/usr/bin/runsc"
CONTAINER_TIMEOUT = 60

# Runs inside the container with /usr/bin/python3; prints RESULT_MARKER + JSON.
INNER = r'''
import json, os, platform, resource, tempfile, time
import psutil
from gvisor_magic import IsolationUnavailable, Limits, detect_environment, run_command_isolated

MARKER = "@@MARKER@@"
DEBUG_DIR = "@@DEBUG_DIR@@"
release = platform.release()
out = {"uid": os.getuid(), "gid": os.getgid(), "release": release,
       "own_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
# The container's cgroup hierarchies: (mount point, "ro"/"rw").
out["cgroup_mounts"] = []
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    kind = fields[fields.index("-") + 1]
    if kind in ("cgroup", "cgroup2"):
        out["cgroup_mounts"].append([fields[4], fields[5].split(",")[0]])

def result(call):
    try:
        r = call()
    except IsolationUnavailable as exc:
        return {"raised": type(exc).__name__, "message": str(exc), "reasons": exc.reasons}
    return {k: getattr(r, k) for k in ("returncode", "stdout", "stderr", "backend", "isolated",
                                        "fallback_reason", "details")}

def environment(info):
    runsc = info.backends["runsc"]
    return {"in_container": info.in_container, "in_kubernetes": info.in_kubernetes,
            "pod_runs_gvisor": info.pod_runs_gvisor, "auto_backend": info.auto_backend,
            "auto_reason": info.auto_reason, "isolated": info.isolated,
            "runsc": {"available": runsc.available, "reason": runsc.reason, "fix": runsc.fix,
                      "details": runsc.details}}

# 1. The first command of a fresh kernel, before anything probed runsc. It
#    appends to a file in its working dir: the count proves it ran exactly once.
work = tempfile.mkdtemp(prefix="work-")
log = os.path.join(work, "runs.log")
out["first"] = result(lambda: run_command_isolated(
    "uname -r; echo ran >> runs.log", working_dir=work, timeout=30))
out["first_runs"] = open(log).read().count("ran") if os.path.exists(log) else 0
# What detect_environment says right after that (probe results are cached).
out["env_after_first"] = environment(detect_environment())
# 2. A fresh probe, then commands as a user would run them.
out["env"] = environment(detect_environment(refresh=True))
out["auto"] = result(lambda: run_command_isolated("uname -r", timeout=30))
out["required"] = result(lambda: run_command_isolated("uname -r", require_isolation=True,
                                                      timeout=30))
# 3. Limits: rlimits from the spec; meanwhile look at runsc's own command line.
runsc_argv = []
def watch(stream, text):
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if not runsc_argv and "run" in argv and any("gvisor-magic-" in a for a in argv):
            runsc_argv.extend(argv)
owned = os.path.join(work, "owned")
out["limits"] = result(lambda: run_command_isolated(
    "echo started; sleep 0.3; ulimit -n; ulimit -u; id -u; echo x > owned",
    working_dir=work, shell="/bin/bash", limits=Limits(max_open_files=100), timeout=30,
    on_output=watch))
out["runsc_argv"] = runsc_argv
out["owned_uid"] = os.stat(owned).st_uid if os.path.exists(owned) else None
# runsc's own account of a failure, when the test asked for --debug-log=DEBUG_DIR/.
out["runsc_fatal"] = []
if os.path.isdir(DEBUG_DIR):
    for name in sorted(os.listdir(DEBUG_DIR)):
        with open(os.path.join(DEBUG_DIR, name), errors="replace") as handle:
            out["runsc_fatal"] += [name.rsplit(".", 2)[-2] + ": " + line.split("] ", 1)[-1].strip()
                                   for line in handle if "FATAL ERROR" in line]
print(MARKER + json.dumps(out), flush=True)
'''
DEBUG_DIR = "/tmp/runsc-debug"
INNER = INNER.replace("@@MARKER@@", containers.RESULT_MARKER).replace("@@DEBUG_DIR@@", DEBUG_DIR)

pytestmark = pytest.mark.runsc


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " -- CI must run the in-container tests (use "
                    "scripts/with_dockerd.py)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def docker_site():
    """A Docker client and a world-readable copy of the package with its dependencies."""
    for path in (RUNSC, containers.CONTAINER_PYTHON):
        if not os.access(path, os.X_OK):
            _unavailable(f"{path} is needed inside the containers (make test installs it)")
    try:
        client = containers.docker_client()
    except containers.DockerUnavailable as exc:
        _unavailable(str(exc))
    base = containers.make_site_dir()
    site = os.path.join(base, "site")
    try:
        containers.build_site(site)
        yield client, site, base
    finally:
        shutil.rmtree(base, ignore_errors=True)
        left = containers.leftover_containers(client)
        client.close()
    assert not left, f"containers left behind: {left}"


def _run(docker_site, **kwargs) -> dict:
    client, site, _ = docker_site
    try:
        run = containers.run_python(client, site, INNER, timeout=CONTAINER_TIMEOUT, **kwargs)
    finally:
        left = containers.leftover_containers(client)
    assert not left, f"containers left behind: {left}"
    assert not run.timed_out, f"the container did not finish in {CONTAINER_TIMEOUT}s"
    data = run.result()
    assert run.exit_code == 0, run.stderr
    return data


@pytest.fixture(scope="module")
def unprivileged(docker_site) -> dict:
    return _run(docker_site)


@pytest.fixture(scope="module")
def privileged(docker_site) -> dict:
    return _run(docker_site, environment={"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
                **containers.PRIVILEGED)


def _as_user(docker_site, tmp_options: str, subids: bool = False, debug: bool = False,
             home_options: str = "rw,nosuid,nodev,uid=1000,gid=1000,mode=0700",
             extra_env: dict | None = None) -> dict:
    """uid/gid 1000 (``jovyan``) in the privileged container, HOME a writable tmpfs."""
    _, _, base = docker_site
    extra_mounts = []
    if subids:
        # What an admin would add to the image: a subordinate range for uid 1000.
        ids = os.path.join(base, "subids")
        with open(ids, "w") as handle:
            handle.write("1000:200000:65536\n")
        os.chmod(ids, 0o644)
        extra_mounts = [("/etc/subuid", ids), ("/etc/subgid", ids)]
    environment = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOME": "/home/jovyan"}
    if debug:  # runsc writes a log per command; INNER collects their FATAL lines
        environment["GVISOR_MAGIC_RUNSC_FLAGS"] = f"--debug --debug-log={DEBUG_DIR}/"
    environment.update(extra_env or {})
    return _run(docker_site, user="1000:1000", environment=environment,
                tmpfs={"/tmp": tmp_options, "/home/jovyan": home_options},
                extra_mounts=extra_mounts, **containers.PRIVILEGED)


# Docker's --tmpfs default is noexec; a pod's /tmp is usually its image's
# filesystem or an emptyDir, neither of them noexec.
TMP_NOEXEC = "rw,nosuid,nodev,noexec,mode=1777,size=256m"
TMP_EXEC = "rw,nosuid,nodev,exec,mode=1777,size=256m"


@pytest.fixture(scope="module")
def user_exec_tmp(docker_site) -> dict:
    return _as_user(docker_site, TMP_EXEC)


@pytest.fixture(scope="module")
def user_noexec_tmp(docker_site) -> dict:
    return _as_user(docker_site, TMP_NOEXEC, debug=True)


@pytest.fixture(scope="module")
def user_noexec_tmp_state_dir(docker_site) -> dict:
    """/tmp noexec, but GVISOR_MAGIC_STATE_DIR on an exec-mounted home."""
    return _as_user(docker_site, TMP_NOEXEC,
                    home_options="rw,exec,nosuid,nodev,uid=1000,gid=1000,mode=0700",
                    extra_env={"GVISOR_MAGIC_STATE_DIR": "/home/jovyan/.gvm-state"})


@pytest.fixture(scope="module")
def user_with_subids(docker_site) -> dict:
    return _as_user(docker_site, TMP_EXEC, subids=True)


def _ran_on_host_once(data: dict) -> None:
    first = data["first"]
    assert data["release"] != GVISOR_RELEASE
    assert data["release"] == platform.release()  # the container shares the host kernel
    assert (first["backend"], first["isolated"], first["returncode"]) == ("subprocess", False, 0)
    assert first["stdout"] == data["release"] + "\n"
    assert data["first_runs"] == 1


def _ran_in_gvisor_once(data: dict) -> None:
    first = data["first"]
    assert (first["backend"], first["isolated"], first["returncode"]) == ("runsc", True, 0)
    assert first["stdout"] == GVISOR_RELEASE + "\n"
    assert first["fallback_reason"] is None
    assert data["first_runs"] == 1
    for key in ("auto", "required"):
        assert (data[key]["backend"], data[key]["isolated"], data[key]["stdout"]) == (
            "runsc", True, GVISOR_RELEASE + "\n"), data[key]


# -- 1. unprivileged pod: default capabilities and seccomp ----------------------

NOT_PERMITTED = "fork/exec /proc/self/exe: operation not permitted"


def test_unprivileged_pod_falls_back_and_says_why(unprivileged):
    data = unprivileged
    _ran_on_host_once(data)
    # runsc got as far as starting its gofer (cgroups were skipped, so no cgroup error).
    assert data["first"]["fallback_reason"].startswith(
        f"runsc: running container: creating container: cannot create gofer process: "
        f"gofer: {NOT_PERMITTED}")
    env = data["env"]
    assert (env["in_container"], env["in_kubernetes"], env["pod_runs_gvisor"]) == (
        True, False, False)
    assert (env["auto_backend"], env["isolated"]) == ("subprocess", False)
    assert env["runsc"]["available"] is False
    assert env["runsc"]["reason"].endswith(NOT_PERMITTED)
    assert "CAP_SYS_ADMIN" in env["runsc"]["fix"]
    assert "CAP_SYS_PTRACE" in env["runsc"]["fix"]
    auto = data["auto"]
    assert (auto["backend"], auto["isolated"], auto["stdout"]) == (
        "subprocess", False, data["release"] + "\n")
    assert NOT_PERMITTED in auto["fallback_reason"]
    assert "(fix: runsc lacks privileges here (in a container it needs CAP_SYS_ADMIN" \
        in auto["fallback_reason"]
    required = data["required"]
    assert required.get("raised") == "IsolationUnavailable", required
    # After the probe, the remembered reason carries the fix as well.
    assert required["reasons"]["runsc"].startswith("sandbox failed to start: running "
                                                    "container: creating container:")
    assert NOT_PERMITTED in required["reasons"]["runsc"]
    assert "CAP_SYS_ADMIN" in required["reasons"]["runsc"]
    assert "isolation is required" in required["message"]


def test_unprivileged_pod_limits_still_apply_without_gvisor(unprivileged):
    limits = unprivileged["limits"]
    assert (limits["backend"], limits["isolated"]) == ("subprocess", False)
    assert limits["stdout"].splitlines()[:2] == ["started", "100"]
    assert unprivileged["runsc_argv"] == []


def test_unprivileged_pod_fix_hint_survives_a_failed_first_command(unprivileged):
    # The first command's failure (no probe before it) keeps runsc's fix hint, both
    # in its fallback_reason and in what detect_environment() reports afterwards.
    assert "CAP_SYS_ADMIN" in (unprivileged["env_after_first"]["runsc"]["fix"] or "")
    assert "CAP_SYS_ADMIN" in unprivileged["first"]["fallback_reason"]


# -- 2. a pod granted CAP_SYS_ADMIN/CAP_SYS_PTRACE, seccomp/apparmor unconfined --

def test_privileged_pod_runs_in_gvisor(privileged):
    data = privileged
    assert data["uid"] == 0
    _ran_in_gvisor_once(data)
    env = data["env"]
    assert (env["in_container"], env["in_kubernetes"], env["pod_runs_gvisor"]) == (
        True, True, False)
    assert (env["auto_backend"], env["isolated"]) == ("runsc", True)
    assert env["runsc"]["details"]["sandbox_kernel"] == GVISOR_RELEASE
    assert env["runsc"]["details"]["identity"] == "root"


def test_privileged_pod_skips_cgroups_and_keeps_rlimits(privileged):
    data = privileged
    # Every cgroup hierarchy in the container is read-only: no sandbox cgroup could
    # be made, and runsc was told so (--ignore-cgroups).
    assert data["cgroup_mounts"], "no cgroup hierarchy mounted in the container"
    assert {mode for _, mode in data["cgroup_mounts"]} == {"ro"}, data["cgroup_mounts"]
    argv = data["runsc_argv"]
    assert argv[:1] == [RUNSC] and "--ignore-cgroups" in argv and "run" in argv, argv
    limits = data["limits"]
    assert (limits["backend"], limits["isolated"], limits["returncode"]) == ("runsc", True, 0)
    # max_open_files=100 as asked; the default 512-process limit, enforced by gVisor.
    assert limits["stdout"].splitlines() == ["started", "100", "512", "0"]
    assert data["own_nofile"] != 100  # the limit is the sandbox's, not the container's
    assert data["owned_uid"] == 0


# -- 3. an ordinary user (jovyan, 1000:1000) in that privileged pod ------------

def test_user_in_privileged_pod_runs_rootless(user_exec_tmp):
    data = user_exec_tmp
    assert (data["uid"], data["gid"]) == (1000, 1000)
    _ran_in_gvisor_once(data)
    env = data["env"]
    assert (env["auto_backend"], env["in_kubernetes"]) == ("runsc", True)
    assert env["runsc"]["details"]["identity"] == "rootless"
    limits = data["limits"]
    assert (limits["backend"], limits["isolated"]) == ("runsc", True)
    # No /etc/subuid range for uid 1000: the user is root inside its own user
    # namespace, and what it writes belongs to uid 1000 outside.
    assert limits["stdout"].splitlines() == ["started", "100", "512", "0"]
    assert data["owned_uid"] == 1000
    assert "--ignore-cgroups" in data["runsc_argv"]


def test_user_with_subuid_range_keeps_its_uid(user_with_subids):
    data = user_with_subids
    _ran_in_gvisor_once(data)
    assert data["env"]["runsc"]["details"]["identity"] == "rootless"
    # newuidmap maps 0 to the subordinate range and 1000 to itself.
    assert data["limits"]["stdout"].splitlines() == ["started", "100", "512", "1000"]
    assert data["owned_uid"] == 1000


NOEXEC_REASON = ("/tmp is mounted noexec, which runsc cannot use inside a user namespace, "
                 "and no other writable exec-mounted directory was found")


def test_user_with_noexec_tmp_falls_back_and_says_why(user_noexec_tmp):
    """With /tmp (and $HOME) mounted noexec, runsc's gofer could not remount the bundle's
    rootfs inside the user namespace (the locked noexec flag would be dropped: EPERM),
    so the runner refuses up front with the reason and the fix, before starting runsc."""
    data = user_noexec_tmp
    _ran_on_host_once(data)
    assert data["first"]["fallback_reason"].startswith(f"runsc: {NOEXEC_REASON}")
    assert "GVISOR_MAGIC_STATE_DIR" in data["first"]["fallback_reason"]
    env = data["env"]
    assert (env["auto_backend"], env["in_kubernetes"]) == ("subprocess", True)
    assert env["runsc"]["reason"] == f"sandbox failed to start: {NOEXEC_REASON}"
    assert "GVISOR_MAGIC_STATE_DIR" in env["runsc"]["fix"]
    required = data["required"]
    assert required.get("raised") == "IsolationUnavailable", required
    assert NOEXEC_REASON in required["reasons"]["runsc"]


def test_user_with_noexec_tmp_and_a_state_dir_runs_in_gvisor(user_noexec_tmp_state_dir):
    data = user_noexec_tmp_state_dir
    _ran_in_gvisor_once(data)
    assert data["env"]["runsc"]["details"]["identity"] == "rootless"
    assert data["owned_uid"] == 1000
