#!/usr/bin/env python3
"""Ten "Python 3 (gVisor)" kernels opened one after another through a real Jupyter server.

Starts ``jupyter server`` with this environment's kernelspec (``pool`` 1, the default, or
``--pool N``) and, as ``gvisor-magic kernelspec install`` does, the extension that starts
the pool's kernels with the server (``--no-prestart``: without it, so the first notebook
teaches the pool its recipe). It waits until the server's first pooled kernel has made its
sockets, as a user's JupyterLab takes a few seconds to load, and reports how long that took
after the server was started. Then for each of ``--kernels`` notebooks in its root dir:
``POST /api/sessions`` (as JupyterLab does when a notebook is opened, so each kernel has
its own notebook) and, on the kernel's websocket, an ``execute_request`` of ``pass``
until its ``execute_reply``. That time is the user's wait. Each kernel is shut down
(``DELETE``) before the next is opened. Reports the median and p95 (nearest rank) and,
after the last, the sandboxes still running (the pool's only) and, once the server has
stopped, any left at all. ``--json`` for JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import psutil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from gvisor_magic.kernel import KERNEL_NAME
from gvisor_magic.kernel.kernelspec import enable_prestart, kernel_json


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sandboxes(mark: str) -> int:
    """runsc sandboxes (their ``runsc-sandbox`` processes) whose state is under ``mark``."""
    count = 0
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "runsc-sandbox" in cmdline.split(" ", 1)[0] and mark in cmdline:
            count += 1
    return count


async def first_reply(base: str, token: str, path: str) -> tuple[float, str]:
    """Open ``path`` on the gVisor kernel: seconds to the first execute_reply, kernel id."""
    client = AsyncHTTPClient()
    started = time.perf_counter()
    body = json.dumps({"path": path, "type": "notebook", "name": path,
                       "kernel": {"name": KERNEL_NAME}})
    reply = await client.fetch(HTTPRequest(f"http://{base}/api/sessions", method="POST",
                                           body=body, headers={"Authorization": f"token {token}"},
                                           request_timeout=300))
    kernel = json.loads(reply.body)["kernel"]["id"]
    ws = await websocket_connect(f"ws://{base}/api/kernels/{kernel}/channels?token={token}")
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench",
                   "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": "pass", "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
    while True:
        message = await asyncio.wait_for(ws.read_message(), 300)
        if message is None:
            raise RuntimeError(f"the kernel of {path} closed its websocket")
        data = json.loads(message)
        if (data.get("msg_type") == "execute_reply"
                and data.get("parent_header", {}).get("msg_id") == msg_id):
            elapsed = time.perf_counter() - started
            ws.close()
            return elapsed, kernel


def pooled_ready(server_pid: int) -> bool:
    """Whether a pooled kernel of the server (a launcher given ``--claim-fd``) has made
    its five sockets, as the pool waits for before it offers one."""
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "--claim-fd" not in cmdline:
            continue
        for arg in cmdline:
            if arg.endswith("connection.json") and os.path.exists(arg):
                with open(arg) as handle:
                    info = json.load(handle)
                if all(os.path.exists(f"{info['ip']}-{info[name]}") for name in (
                        "shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")):
                    return True
    return False


async def run(args: argparse.Namespace, base: str, token: str, mark: str) -> dict:
    client = AsyncHTTPClient()
    times, during = [], []
    for index in range(args.kernels):
        elapsed, _ = await first_reply(base, token, f"notebook-{index}.ipynb")
        times.append(elapsed)
        sessions = json.loads((await client.fetch(
            f"http://{base}/api/sessions", headers={"Authorization": f"token {token}"})).body)
        for session in sessions:
            await client.fetch(HTTPRequest(f"http://{base}/api/sessions/{session['id']}",
                                           method="DELETE",
                                           headers={"Authorization": f"token {token}"}))
        during.append(sandboxes(mark))
        await asyncio.sleep(args.pause)
    ranked = sorted(times)
    return {"kernels": args.kernels, "pool": args.pool,
            "first_reply_s": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3),
            "p95_s": round(ranked[max(0, -(-95 * len(ranked) // 100) - 1)], 3),
            "sandboxes_after_each_shutdown": during}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=10)
    parser.add_argument("--pool", type=int, default=1)
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds between a kernel's shutdown and the next open")
    parser.add_argument("--no-prestart", dest="prestart", action="store_false",
                        help="without the extension that starts pooled kernels with the server")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="gvm-bench-server-")
    work = os.path.join(home, "work")
    specs = os.path.join(home, "share", "jupyter", "kernels", KERNEL_NAME)
    os.makedirs(work)
    os.makedirs(specs)
    with open(os.path.join(specs, "kernel.json"), "w") as handle:
        json.dump(kernel_json({"pool": args.pool}), handle)
    token, port = secrets.token_hex(16), free_port()
    state = os.path.join(home, "state")
    os.makedirs(state)
    config = os.path.join(home, "config")
    if args.prestart:
        enable_prestart(config)
    env = dict(os.environ, JUPYTER_PATH=os.path.join(home, "share", "jupyter"),
               JUPYTER_CONFIG_DIR=config,
               JUPYTER_RUNTIME_DIR=os.path.join(home, "runtime"),
               JUPYTER_DATA_DIR=os.path.join(home, "data"), GVISOR_MAGIC_STATE_DIR=state)
    log = open(os.path.join(home, "server.log"), "wb")  # noqa: SIM115 (closed below)
    launched = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--port={port}", "--no-browser",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    with open(log.name, "rb") as said:
                        tail = said.read()[-2000:].decode("utf-8", "replace")
                    raise SystemExit(f"the Jupyter server did not start:\n{tail}") from None
                time.sleep(0.2)
        pool_ready_s = None
        if args.prestart and args.pool:
            while not pooled_ready(server.pid):
                if time.monotonic() > deadline + 300 or server.poll() is not None:
                    raise SystemExit("the server started no kernel ahead of need")
                time.sleep(0.05)
            pool_ready_s = round(time.perf_counter() - launched, 3)
        report = asyncio.run(run(args, base, token, state))
        report["prestart"] = args.prestart
        report["pool_ready_after_server_start_s"] = pool_ready_s
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    deadline = time.monotonic() + 30
    while sandboxes(state) and time.monotonic() < deadline:
        time.sleep(0.2)
    report["sandboxes_after_the_server_stopped"] = sandboxes(state)
    shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    setup = f"pool {args.pool}" + ("" if args.prestart else ", no prestart")
    print(f"{args.kernels} kernels opened one after another through jupyter server "
          f"({setup}): first execute_reply median {report['median_s'] * 1000:.0f} ms, "
          f"p95 {report['p95_s'] * 1000:.0f} ms")
    if report["pool_ready_after_server_start_s"] is not None:
        print(f"the server's first pooled kernel was ready "
              f"{report['pool_ready_after_server_start_s']:.1f} s after the server was started")
    print("each:", ", ".join(f"{t * 1000:.0f}" for t in report["first_reply_s"]), "ms")
    print("sandboxes running after each shutdown:", report["sandboxes_after_each_shutdown"],
          "| after the server stopped:", report["sandboxes_after_the_server_stopped"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
