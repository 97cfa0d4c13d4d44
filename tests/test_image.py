"""The single-user image of deploy/kubernetes/Dockerfile, built here and run as both pod set-ups.

``scripts/build_image.py`` builds it (a debootstrapped Debian base with the docker-stacks
contract, then the real Dockerfile, runsc from Debian's backports). Each set-up of
docs/deploy.md is reproduced with Docker as Kubernetes would run the pod:

- (a) *gVisor pods*: the container under the ``runsc`` runtime (``runtimeClassName: gvisor``),
  as uid 1000, no privileges, ``GVISOR_MAGIC_MODE=auto`` as the values file sets;
- (b) *runsc inside ordinary pods*: runc with exactly the values file's grants
  (``CAP_SYS_ADMIN``, ``CAP_SYS_PTRACE``, seccomp and AppArmor unconfined), as uid 1000, with
  its environment and its memory-backed ``/var/lib/gvisor-magic``.

In each, the real single-user server (``jupyter-server`` from the image) starts, and a cell
runs through its REST and WebSocket API, as the hub's proxy would send it: the extension is
loaded by the image's kernel config, ``%%isolated`` runs, and the result must say what
docs/deploy.md promises for that set-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import containers

ROOT = Path(__file__).resolve().parent.parent
GVISOR_RELEASE = "4.4.0"

# Runs inside the container with the image's own Python: the server, then a client of it.
DRIVER = r'''
import json, os, subprocess, sys, time, urllib.request, uuid
from tornado.ioloop import IOLoop
from tornado.websocket import websocket_connect

TOKEN = uuid.uuid4().hex
server = subprocess.Popen(
    ["jupyter-server", "--ip=127.0.0.1", "--port=8888", "--no-browser",
     f"--IdentityProvider.token={TOKEN}", "--ServerApp.root_dir=/home/jovyan"],
    stdout=subprocess.DEVNULL, stderr=open("/tmp/server.log", "w"))
BASE = "http://127.0.0.1:8888"


def call(method, path, body=None):
    request = urllib.request.Request(BASE + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
        return json.loads(text) if text else None


for _ in range(600):
    try:
        version = call("GET", "/api/status")
        break
    except Exception:
        time.sleep(0.1)
else:
    sys.exit("the server did not answer: " + open("/tmp/server.log").read()[-3000:])

CELLS = ["%%isolated --result r\nuname -r\nid -u\n",
         "import json, os\nprint(json.dumps({'backend': r.backend, 'isolated': r.isolated, "
         "'fallback_reason': r.fallback_reason, 'details': r.details, "
         "'kernel_uid': os.getuid()}))"]


async def run_cells(kernel_id):
    ws = await websocket_connect(f"ws://127.0.0.1:8888/api/kernels/{kernel_id}/channels"
                                 f"?token={TOKEN}")
    session, found = uuid.uuid4().hex, []
    for code in CELLS:
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session,
                       "username": "jovyan", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        cell = {"stdout": "", "stderr": "", "displays": [], "status": None}
        idle = False  # iopub and shell are separate channels: wait for the reply and idle
        while cell["status"] is None or not idle:
            msg = json.loads(await ws.read_message())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                cell[content["name"]] += content["text"]
            elif kind == "display_data":
                cell["displays"].append(content["data"].get("text/plain", ""))
            elif kind == "error":
                cell["stderr"] += f"{content['ename']}: {content['evalue']}"
            elif kind == "execute_reply":
                cell["status"] = content["status"]
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        found.append(cell)
    ws.close()
    return found


try:
    kernel = call("POST", "/api/kernels", {"name": "python3"})
    cells = IOLoop.current().run_sync(lambda: run_cells(kernel["id"]), timeout=300)
    call("DELETE", f"/api/kernels/{kernel['id']}")
    print("@@MARKER@@" + json.dumps({"server": version, "cells": cells,
                                     "server_uid": os.getuid()}))
finally:
    server.terminate()
    server.wait(timeout=30)
'''.replace("@@MARKER@@", containers.RESULT_MARKER)

#: Set-up (a), as deploy/kubernetes/values-gvisor-pods.yaml describes the pod.
GVISOR_POD = {"runtime": "runsc", "user": "1000:100",
              "environment": {"GVISOR_MAGIC_MODE": "auto"}}
#: Set-up (b), as deploy/kubernetes/values-runsc-in-pod.yaml grants it.
RUNSC_IN_POD = {"runtime": "runc", "user": "1000:100", **containers.PRIVILEGED,
                "environment": {"GVISOR_MAGIC_REQUIRE_ISOLATION": "1",
                                "GVISOR_MAGIC_MODE": "runsc",
                                "GVISOR_MAGIC_STATE_DIR": "/var/lib/gvisor-magic"},
                # A Memory emptyDir: not noexec (Docker's --tmpfs is, unless told "exec").
                "tmpfs": {"/var/lib/gvisor-magic": "rw,exec,nosuid,nodev,size=1g,uid=1000,"
                                                   "gid=100"}}


@pytest.fixture(scope="module")
def image(docker_works) -> str:
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (debootstrap, chroot)")
    from gvisor_magic import __version__

    tag = f"gvisor-magic/singleuser:{__version__}"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_image.py"),
                           "--tag", tag], capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return tag


def _pod(image: str, setup: dict) -> dict:
    client = containers.docker_client()
    try:
        output = client.containers.run(
            image, ["/opt/conda/bin/python", "-c", DRIVER], network_mode="none",
            labels=dict(containers.LABELS), remove=True, stdout=True, stderr=True,
            **setup).decode("utf-8", "replace")
    finally:
        left = containers.leftover_containers(client)
        client.close()
    assert not left, f"containers left behind: {left}"
    lines = [ln for ln in output.splitlines() if ln.startswith(containers.RESULT_MARKER)]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len(containers.RESULT_MARKER):])


@pytest.fixture(scope="module")
def gvisor_pod(image) -> dict:
    return _pod(image, GVISOR_POD)


@pytest.fixture(scope="module")
def runsc_in_pod(image) -> dict:
    return _pod(image, RUNSC_IN_POD)


def _report(pod: dict) -> dict:
    cell, report = pod["cells"]
    assert cell["status"] == "ok", cell
    assert report["status"] == "ok", report
    return json.loads(report["stdout"])


def test_the_image_has_runsc_the_package_and_the_kernel_config(image):
    client = containers.docker_client()
    try:
        out = client.containers.run(
            image, ["sh", "-c", "runsc --version | head -1; gvisor-magic --version; id -u; "
                    "grep -c jovyan /etc/subuid; cat $CONDA_DIR/etc/ipython/"
                    "ipython_kernel_config.py"],
            runtime="runc", network_mode="none", remove=True,
            labels=dict(containers.LABELS)).decode()
    finally:
        client.close()
    from gvisor_magic import __version__

    lines = out.splitlines()
    assert lines[0].startswith("runsc version 0.0~2024"), out  # bookworm-backports' build
    assert lines[1:4] == [f"gvisor-magic {__version__}", "1000", "1"], out
    assert 'c.InteractiveShellApp.extensions = ["gvisor_magic"]' in out


def test_gvisor_pod_runs_the_cell_in_the_pods_own_sandbox(gvisor_pod):
    """(a): docs/deploy.md: cells run in the pod's own sandbox, next to the kernel; the
    result says so (not isolated from the kernel, pod_sandbox gVisor); uid 1000."""
    cell = gvisor_pod["cells"][0]
    assert cell["stdout"] == f"{GVISOR_RELEASE}\n1000\n", cell
    report = _report(gvisor_pod)
    assert (report["backend"], report["isolated"]) == ("subprocess", False), report
    assert report["details"]["pod_sandbox"] == "gVisor"
    assert report["fallback_reason"].startswith("this pod already runs under gVisor")
    assert report["kernel_uid"] == gvisor_pod["server_uid"] == 1000
    # Needs attention (it shares the kernel's sandbox): said loudly, not as a quiet badge.
    assert "WARNING: subprocess (NOT isolated)" in cell["stderr"], cell


def test_runsc_in_ordinary_pod_runs_the_cell_in_its_own_gvisor_sandbox(runsc_in_pod):
    """(b): docs/deploy.md: a sandbox of its own per kernel, isolated, as the user (uid 1000
    kept inside through jovyan's subordinate range), fail-closed set."""
    cell = runsc_in_pod["cells"][0]
    assert cell["stdout"] == f"{GVISOR_RELEASE}\n1000\n", cell
    assert cell["displays"] == ["[gvisor-magic] runsc (gVisor): exit 0"], cell
    assert "[gvisor-magic]" not in cell["stderr"], cell
    report = _report(runsc_in_pod)
    assert (report["backend"], report["isolated"]) == ("runsc", True), report
    assert report["fallback_reason"] is None
    assert report["kernel_uid"] == runsc_in_pod["server_uid"] == 1000
