"""Set-up (a): the whole single-user pod runs under gVisor (``runtimeClassName: gvisor``).

Reproduced for real with a Docker container on the ``runsc`` runtime: the
package runs inside gVisor, as a kernel in such a pod would. runsc cannot start
a sandbox inside gVisor, so commands run in the pod's own sandbox; the result,
``doctor`` and the widget's state must say exactly that, not "runs on the host"
nor "add a gVisor RuntimeClass", and fail-closed must still refuse.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from support import containers

GVISOR_RELEASE = "4.4.0"

INNER = r'''
import json, subprocess, sys
from gvisor_magic import IsolationUnavailable, detect_environment, run_command_isolated
from gvisor_magic.notebook.widget import IsolationState

info = detect_environment()
r = run_command_isolated("uname -r; echo ran >> /tmp/runs", timeout=60)
state = IsolationState()
state.record(r)
try:
    run_command_isolated("echo must-not-run >> /tmp/runs", require_isolation=True, timeout=60)
    required = "ran"
except IsolationUnavailable as exc:
    required = str(exc)
doctor = subprocess.run([sys.executable, "-m", "gvisor_magic.cli", "doctor"],
                        capture_output=True, text=True, timeout=120)
print("@@MARKER@@" + json.dumps({
    "pod_runs_gvisor": info.pod_runs_gvisor, "auto_backend": info.auto_backend,
    "runsc_fix": info.backends["runsc"].fix,
    "backend": r.backend, "isolated": r.isolated, "stdout": r.stdout,
    "fallback_reason": r.fallback_reason, "details": r.details,
    "headline": state.headline, "html": state.to_html(),
    "required": required, "runs": open("/tmp/runs").read(),
    "doctor": doctor.stdout, "doctor_rc": doctor.returncode}))
'''.replace("@@MARKER@@", containers.RESULT_MARKER)


@pytest.fixture(scope="module")
def inside(docker_works) -> dict:
    client = containers.docker_client()
    base = containers.make_site_dir()
    site = os.path.join(base, "site")
    try:
        containers.build_site(site)
        from gvisor_magic.backends.docker_image import ensure_scratch_image

        image = ensure_scratch_image(client)
        # The runtime registered by scripts/install_gvisor.py --docker (network none).
        output = client.containers.run(
            image, [containers.CONTAINER_PYTHON, "-c", INNER], runtime="runsc",
            network_mode="none", labels=dict(containers.LABELS), remove=True,
            mounts=containers.mounts_for(site), tmpfs={"/tmp": "rw,exec,mode=1777"},
            environment={"PYTHONPATH": containers.SITE_MOUNT, "HOME": "/tmp",
                         "PYTHONDONTWRITEBYTECODE": "1",
                         "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"},
            stdout=True, stderr=True).decode("utf-8", "replace")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        left = containers.leftover_containers(client)
        client.close()
    assert not left, f"containers left behind: {left}"
    line = next(ln for ln in output.splitlines() if ln.startswith(containers.RESULT_MARKER))
    return json.loads(line[len(containers.RESULT_MARKER):])


def test_detects_that_the_pod_itself_runs_under_gvisor(inside):
    assert inside["pod_runs_gvisor"] is True
    assert inside["stdout"] == GVISOR_RELEASE + "\n"  # the command did run in gVisor's kernel
    assert inside["runs"] == "ran\n"  # exactly once, and the refused one never ran


def test_result_says_the_command_shares_the_pods_sandbox(inside):
    assert (inside["backend"], inside["isolated"]) == ("subprocess", False)
    assert inside["fallback_reason"].startswith("this pod already runs under gVisor: runsc "
                                                "cannot start a sandbox inside it")
    assert inside["details"]["pod_sandbox"] == "gVisor"
    # No advice to add what the pod already has.
    assert "RuntimeClass" not in inside["fallback_reason"]
    assert inside["runsc_fix"].startswith("none needed: this pod already runs under gVisor")


def test_doctor_and_widget_say_so(inside):
    assert inside["doctor_rc"] == 0
    doctor = inside["doctor"]
    assert "this process already runs under gVisor: yes" in doctor
    assert ("commands will run with: subprocess -> NOT ISOLATED from the kernel (inside the "
            "pod's own gVisor sandbox)") in doctor
    assert "note: this pod already runs under gVisor" in doctor
    assert inside["headline"] == ("NOT isolated from the kernel (subprocess; pod runs under "
                                  "gVisor)")
    assert "the pod&#x27;s gVisor sandbox, shared with the kernel" in inside["html"]


def test_fail_closed_still_refuses(inside):
    assert inside["required"].startswith("cannot run the command with runsc or docker and "
                                         "isolation is required"), inside["required"]
