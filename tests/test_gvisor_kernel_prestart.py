"""A Jupyter server with "Python 3 (gVisor)" installed starts its pooled kernel as it starts,
so the first notebook opened in its root dir gets a kernel that was ready, not only the
second; where gVisor cannot run, or the kernelspec says ``pool`` 0, it starts nothing and
says why in its log. A real ``jupyter server``, its REST API and a kernel's websocket, as
JupyterLab drives them; the kernelspec and the extension installed by the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from gvisor_magic.kernel import KERNEL_NAME

SERVER_START = 60.0
#: A kernel's start in gVisor takes about 2 s here; a loaded 2-core machine, far more.
KERNEL_START = 180.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``jupyter server`` in ``home`` (its own HOME, Jupyter dirs and run-dir base)."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.root = home / "work"
        self.root.mkdir()
        self.state = home / "state"
        self.state.mkdir()
        self.env = {**os.environ, "HOME": str(home), "JUPYTER_DATA_DIR": str(home / "data"),
                    "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
                    "GVISOR_MAGIC_STATE_DIR": str(self.state), **(extra_env or {})}
        self.env.pop("JUPYTER_CONFIG_DIR", None)
        self.token, self.port = secrets.token_hex(16), _free_port()
        self.log_path = home / "server.log"
        self.process: subprocess.Popen | None = None

    def install(self, *args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "gvisor_magic.cli", "kernelspec",
                               "install", "--user", *args], env=self.env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyter_server", f"--port={self.port}",
                 "--no-browser", f"--IdentityProvider.token={self.token}",
                 f"--ServerApp.root_dir={self.root}",
                 *(["--allow-root"] if os.geteuid() == 0 else [])],
                env=self.env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + SERVER_START
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None, self.log()
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, seconds: float = KERNEL_START) -> str:
        deadline = time.monotonic() + seconds
        while text not in self.log():
            assert self.process is not None and self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.log()}"
            time.sleep(0.1)
        return self.log()

    def launchers(self) -> list[psutil.Process]:
        """The kernel launchers the server runs, pooled (``--claim-fd``) or not."""
        assert self.process is not None
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "gvisor_magic.kernel.launch" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def pooled(self) -> list[int]:
        pids = []
        for launcher in self.launchers():
            try:
                if "--claim-fd" in launcher.cmdline():
                    pids.append(launcher.pid)
            except psutil.Error:
                continue
        return pids

    def api(self, method: str, path: str, body: dict | None = None) -> dict | list:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=KERNEL_START) as reply:
            data = reply.read()
        return json.loads(data) if data else {}

    def execute(self, kernel_id: str, code: str) -> str:
        """Run ``code`` on the kernel's websocket, as JupyterLab does; its stdout."""
        from tornado.websocket import websocket_connect

        async def run() -> str:
            ws = await websocket_connect(f"ws://127.0.0.1:{self.port}/api/kernels/"
                                         f"{kernel_id}/channels?token={self.token}")
            msg_id, out = uuid.uuid4().hex, []
            ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t",
                           "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": False,
                            "user_expressions": {}, "allow_stdin": False,
                            "stop_on_error": True}}))
            while True:
                message = await asyncio.wait_for(ws.read_message(), KERNEL_START)
                assert message is not None, "the kernel's websocket closed"
                data = json.loads(message)
                if data.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if data["msg_type"] == "stream":
                    out.append(data["content"]["text"])
                elif data["msg_type"] == "error":
                    raise AssertionError(data["content"])
                elif data["msg_type"] == "execute_reply":
                    ws.close()
                    return "".join(out)

        return asyncio.run(run())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def server(tmp_path):
    made = []

    def make(extra_env: dict[str, str] | None = None) -> Server:
        made.append(Server(tmp_path, extra_env))
        return made[-1]

    yield make
    for one in made:
        one.stop()


def _sandboxes(state: Path) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "runsc" in cmdline and str(state) in cmdline:
            found.append(process.pid)
    return found


def test_the_first_notebook_gets_a_kernel_started_with_the_server(runsc_works, server):
    one = server()
    one.install()
    one.start()
    # Before anything asked for a kernel, the server starts one for its root dir.
    one.wait_for_log(f"starting 1 {KERNEL_NAME} kernel(s) ahead of need, for notebooks in "
                     f"{os.path.realpath(one.root)}")
    deadline = time.monotonic() + KERNEL_START
    while not one.pooled():
        assert time.monotonic() < deadline, one.log()
        time.sleep(0.1)
    [pooled] = one.pooled()
    assert not one.api("GET", "/api/kernels")  # it is no kernel of the server's yet

    session = one.api("POST", "/api/sessions", {
        "path": "first.ipynb", "type": "notebook", "name": "first.ipynb",
        "kernel": {"name": KERNEL_NAME}})
    kernel_id = session["kernel"]["id"]
    log = one.wait_for_log("the kernel was started ahead of need")
    assert f"the kernel was started ahead of need (launcher {pooled}," in log, log
    said = one.execute(kernel_id, "import os, platform\nprint(platform.release())\n"
                                  "print(os.getcwd())\nprint(__session__)")
    release, cwd, notebook = said.split("\n")[:3]
    assert (release, cwd) == ("4.4.0", os.path.realpath(one.root)), said
    assert notebook.endswith("first.ipynb"), said
    # The pool keeps one more of that recipe: a new launcher, the claimed one runs on.
    deadline = time.monotonic() + KERNEL_START
    while not [pid for pid in one.pooled() if pid != pooled]:
        assert time.monotonic() < deadline, one.log()
        time.sleep(0.1)
    assert pooled in [launcher.pid for launcher in one.launchers()]

    one.stop()
    deadline = time.monotonic() + 60
    while _sandboxes(one.state) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _sandboxes(one.state), "sandboxes outlived their server"


def test_where_gvisor_cannot_run_the_server_starts_no_kernel_and_says_why(server, tmp_path):
    one = server({"GVISOR_MAGIC_RUNSC": str(tmp_path / "no-runsc-here")})
    one.install()
    one.start()
    log = one.wait_for_log(f"no {KERNEL_NAME} kernel started ahead of need", 120)
    assert "Python 3 (gVisor) cannot start" in log, log
    assert not one.pooled() and not _sandboxes(one.state)


def test_a_kernelspec_with_pool_0_gets_no_kernel_at_the_server_start(server):
    one = server()
    one.install("--pool", "0")
    one.start()
    one.wait_for_log(f"{KERNEL_NAME} has pool 0: no kernel is started ahead of need", 120)
    assert not one.pooled()
