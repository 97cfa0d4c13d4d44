#!/usr/bin/env python3
"""Start JupyterLab on 127.0.0.1 with gvisor_magic available and ``notebooks/`` open.

    .venv/bin/python scripts/lab.py            # serve until Ctrl-C, print the URL (make lab)
    .venv/bin/python scripts/lab.py --check    # start, prove it serves, stop again (exit 0/1)

The server binds 127.0.0.1 only, on port 8888 when it is free and on a free
port otherwise, with a fresh random token: the printed URL is the way in.
``--check`` is what CI runs instead of the blocking server: it also opens the
extension in a real kernel of the server and shuts everything down gracefully.
The browser test reuses ``LabServer`` from this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PREFERRED_PORT = 8888
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


def free_port(preferred: int | None = PREFERRED_PORT) -> int:
    """``preferred`` when nothing listens on it on 127.0.0.1, else any free port."""
    candidates = [preferred, 0] if preferred else [0]
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1")


class LabServer:
    """One JupyterLab server process, started and stopped by us (a context manager).

    Kernels inherit ``env``; a test passes its own ``TMPDIR`` so it can check
    that every kernel closed its sandbox when the server stopped.
    """

    def __init__(self, root: Path = NOTEBOOKS, port: int | None = None,
                 env: dict[str, str] | None = None, log_path: str | None = None,
                 quiet: bool = True) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.token = secrets.token_hex(24)
        self.env = dict(os.environ if env is None else env)
        # The venv's own kernelspec first, not one in ~/.local/share/jupyter.
        self.env.setdefault("JUPYTER_PREFER_ENV_PATH", "1")
        self.log_path = log_path
        self.quiet = quiet
        self.process: subprocess.Popen | None = None
        self._log = None
        self._config_dir: str | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/lab?token={self.token}"

    def notebook_url(self, name: str) -> str:
        return f"{self.base}/lab/tree/{name}?token={self.token}"

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> LabServer:
        # A private config dir: no user or machine config changes what is served,
        # and JupyterLab's workspace state starts empty every time.
        self._config_dir = tempfile.mkdtemp(prefix="gvm-lab-config-")
        settings = Path(self._config_dir, "settings", "@jupyterlab", "apputils-extension")
        settings.mkdir(parents=True)
        # No "official Jupyter news?" prompt: nothing is fetched from outside this machine.
        (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
        # "Python 3 (gVisor)" in the launcher: its kernelspec in the private config too.
        from gvisor_magic.kernel import KERNEL_NAME
        from gvisor_magic.kernel.kernelspec import kernel_json

        kernels = Path(self._config_dir, "data", "kernels", KERNEL_NAME)
        kernels.mkdir(parents=True)
        (kernels / "kernel.json").write_text(json.dumps(kernel_json(), indent=1))
        path = os.pathsep.join(p for p in (str(kernels.parent.parent),
                                           self.env.get("JUPYTER_PATH", "")) if p)
        env = dict(self.env, JUPYTER_CONFIG_DIR=self._config_dir,
                   JUPYTERLAB_WORKSPACES_DIR=self._config_dir, JUPYTER_PATH=path,
                   JUPYTERLAB_SETTINGS_DIR=str(settings.parent.parent))
        argv = [sys.executable, "-m", "jupyterlab", "--no-browser",
                "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}", "--ServerApp.open_browser=False",
                "--LabApp.news_url=", "--LabApp.check_for_updates_class="
                "jupyterlab.NeverCheckForUpdate"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        if self.log_path:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            argv, env=env, cwd=self.root, stdin=subprocess.DEVNULL,
            stdout=self._log or (subprocess.DEVNULL if self.quiet else None),
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode} "
                                   f"(log: {self.log_path or 'not kept'})")
            with contextlib.suppress(OSError, ValueError):
                self.api("GET", "/api/status")
                return
            time.sleep(0.3)
        raise TimeoutError(f"JupyterLab did not answer within {START_TIMEOUT:.0f}s")

    def api(self, method: str, path: str, body: dict | None = None) -> object:
        """A REST call with the token; JSON in and out."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"token {self.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def shutdown_kernels(self) -> None:
        """Ask each kernel to shut down, as the Lab UI does, so they close their sandboxes."""
        with contextlib.suppress(OSError, ValueError):
            for kernel in self.api("GET", "/api/kernels") or []:
                with contextlib.suppress(OSError, ValueError):
                    self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def stop(self) -> None:
        """Kernels first (gracefully), then the server; idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            self.shutdown_kernels()
            with contextlib.suppress(OSError, ValueError):
                self.api("POST", "/api/shutdown")
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._config_dir is not None:
            import shutil

            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def check(server: LabServer) -> list[str]:
    """What is wrong with a running server (empty: it serves what `make lab` promises)."""
    problems = []
    contents = server.api("GET", "/api/contents")
    names = {item["name"] for item in contents["content"]}
    if "01-quickstart.ipynb" not in names:
        problems.append(f"notebooks/ is not the open folder (it lists {sorted(names)})")
    page = urllib.request.urlopen(server.url, timeout=30).read().decode(errors="replace")
    if "jupyter-config-data" not in page:
        problems.append("/lab did not serve the JupyterLab page")
    labextensions = json.loads(page.split('id="jupyter-config-data"', 1)[1]
                               .split(">", 1)[1].split("</script>", 1)[0])
    federated = {ext.get("name") for ext in labextensions.get("federated_extensions", [])}
    if "@jupyter-widgets/jupyterlab-manager" not in federated:
        problems.append(f"the ipywidgets lab extension is missing (found {sorted(federated)})")
    kernel = server.api("POST", "/api/kernels", {"name": "python3"})
    try:
        problems += _check_kernel(server, kernel["id"])
    finally:
        server.api("DELETE", f"/api/kernels/{kernel['id']}")
    return problems


def _check_kernel(server: LabServer, kernel_id: str) -> list[str]:
    """Load the extension in a kernel of the server, through its websocket."""
    from websocket import create_connection  # jupyter_server depends on websocket-client

    ws = create_connection(
        f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {server.token}"], timeout=60)
    try:
        msg_id = secrets.token_hex(8)
        code = ("%load_ext gvisor_magic\nimport gvisor_magic, sys\n"
                "print('prefix', sys.prefix, 'extension', gvisor_magic.__version__)")
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "lab",
                       "session": secrets.token_hex(8), "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False}}))
        output, deadline = "", time.monotonic() + 120
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                output += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                return [f"the kernel could not load gvisor_magic: {msg['content']['evalue']}"]
            elif msg["msg_type"] == "execute_reply":
                break
    finally:
        ws.close()
    if f"prefix {sys.prefix} " not in output:
        return [f"the kernel does not run this environment's Python: {output!r}"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="start, check that it serves notebooks/ and the extension, stop")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default: {PREFERRED_PORT} if free, else any free one)")
    args = parser.parse_args(argv)
    server = LabServer(port=args.port, quiet=args.check)
    server.start()
    try:
        if args.check:
            problems = check(server)
            for problem in problems:
                print(f"lab: {problem}", file=sys.stderr)
            print(f"lab: {'FAILED' if problems else 'ok'}: JupyterLab served notebooks/ "
                  f"with gvisor_magic at {server.base}")
            return 1 if problems else 0
        print(f"\nJupyterLab is running with gvisor_magic; open:\n\n    {server.url}\n\n"
              f"(127.0.0.1 only; Ctrl-C stops it and its kernels)", flush=True)
        # SIGINT too: a shell that starts us in the background has it ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for stop in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(stop, lambda *_: sys.exit(0))
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
