"""A real, local JupyterHub for the end-to-end tests, and a small client for it.

The hub runs as root with ``configurable-http-proxy`` (npm, installed by
``make e2e-deps`` into ``.e2e/node_modules``), the ``DummyAuthenticator`` and
the local-process spawner, so each user's single-user server runs as that
user's own uid with the environment the hub gives it. Everything binds
127.0.0.1 on free ports; the database, cookie secret and pid files live in a
temporary directory. ``Hub.stop`` stops the hub, which stops the servers and
the proxy it started, and reports any process of ours still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / ".e2e" / "node_modules" / ".bin" / "configurable-http-proxy"
#: What the hub gives every server: fail closed, and a secret of the user's own.
HUB_ENVIRONMENT = {"GVISOR_MAGIC_REQUIRE_ISOLATION": "1"}
#: The named server whose hub points GVISOR_MAGIC_RUNSC at nothing: a machine without runsc.
NO_RUNSC_SERVER = "no-runsc"
MISSING_RUNSC = "/nonexistent/gvisor-magic-e2e/runsc"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONFIG = '''
import os
c = get_config()  # noqa: F821
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {proxy_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/cookie_secret"
c.JupyterHub.pid_file = "{state}/jupyterhub.pid"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.allow_named_servers = True
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allowed_users = {{{user!r}}}
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
c.ConfigurableHTTPProxy.should_start = True
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [{python!r}, "-m", "jupyterhub.singleuser"]
c.Spawner.args = ["--ServerApp.ip=127.0.0.1"]
c.Spawner.environment = {environment!r}
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
c.LocalProcessSpawner.shell_cmd = []


def per_server(spawner):
    # The second server stands for a machine without a usable runsc.
    if spawner.name == {no_runsc_server!r}:
        spawner.environment = dict(spawner.environment, GVISOR_MAGIC_RUNSC={missing_runsc!r})


c.Spawner.pre_spawn_hook = per_server
'''


@dataclass
class Hub:
    """One running JupyterHub (``start``/``stop``) and the REST calls the tests make."""

    state: Path
    user: str
    python: str
    environment: Mapping[str, str]
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    proxy_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)
    proxy_api_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    token: str | None = None
    log_path: Path | None = None
    #: Every pid the hub ever had as a descendant (proxy, servers, kernels, runsc...).
    seen_pids: dict[int, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start(self) -> None:
        if not os.access(PROXY, os.X_OK):
            raise RuntimeError(f"{PROXY} is missing: run `make e2e-deps` (npm install of "
                               "configurable-http-proxy)")
        config = self.state / "jupyterhub_config.py"
        config.write_text(textwrap.dedent(CONFIG.format(
            proxy_port=self.proxy_port, hub_port=self.hub_port, state=self.state,
            password=self.password, user=self.user, proxy=str(PROXY),
            proxy_api_port=self.proxy_api_port, python=self.python,
            environment=dict(self.environment), no_runsc_server=NO_RUNSC_SERVER,
            missing_runsc=MISSING_RUNSC)))
        self.log_path = self.state / "jupyterhub.log"
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:"
                       "/usr/sbin:/sbin",
               "LANG": "C.UTF-8", "HOME": str(self.state)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=self.state,
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._wait(lambda: self._get("/hub/api/").status_code == 200, 60, "the hub's API")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path else ""

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.remember_descendants()
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the hub exited ({self.process.returncode}) while waiting "
                                   f"for {what}:\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{self.log()}")
            time.sleep(0.2)

    def remember_descendants(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.seen_pids.setdefault(child.pid, " ".join(child.cmdline())[:200])

    # -- REST -------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def _get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self._headers(), timeout=30)

    def call(self, method: str, path: str, body: object = None,
             expect: tuple[int, ...] = (200, 201, 202, 204)) -> requests.Response:
        response = requests.request(method, self.url + path, headers=self._headers(),
                                    data=None if body is None else json.dumps(body), timeout=60)
        if response.status_code not in expect:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: "
                               f"{response.text[:1000]}\n{self.log()}")
        return response

    def log_in(self) -> str:
        """A token for the user, issued against its name and password (no admin token)."""
        response = self.call("POST", f"/hub/api/users/{self.user}/tokens",
                             {"auth": {"username": self.user, "password": self.password},
                              "note": "gvisor-magic e2e"})
        self.token = response.json()["token"]
        return self.token

    def start_server(self, name: str = "") -> str:
        """Start the user's (named) server; return its URL prefix once it answers."""
        suffix = f"/servers/{name}" if name else "/server"
        self.call("POST", f"/hub/api/users/{self.user}{suffix}", {})

        def ready() -> bool:
            servers = self.call("GET", f"/hub/api/users/{self.user}").json()["servers"]
            return bool(servers.get(name, {}).get("ready"))

        self._wait(ready, 120, f"server {name or 'default'!r}")
        prefix = f"/user/{self.user}/{name + '/' if name else ''}"
        self._wait(lambda: self._get(prefix + "api/status").status_code == 200, 60,
                   f"server {name!r} through the proxy")
        return prefix

    def stop_server(self, name: str = "") -> None:
        suffix = f"/servers/{name}" if name else "/server"
        self.call("DELETE", f"/hub/api/users/{self.user}{suffix}", expect=(202, 204))

        def stopped() -> bool:
            servers = self.call("GET", f"/hub/api/users/{self.user}").json()["servers"]
            server = servers.get(name, {})
            return not server.get("pending") and not server.get("started")

        self._wait(stopped, 60, f"server {name!r} to stop")

    def stop(self) -> list[str]:
        """Stop the hub (it stops its servers and proxy); kill and list what survived."""
        self.remember_descendants()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        survivors = []
        for pid, cmdline in self.seen_pids.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE \
                        and " ".join(proc.cmdline())[:200] == cmdline:
                    survivors.append(f"{pid}: {cmdline}")
                    proc.kill()
        return survivors


class Kernel:
    """A kernel of the user's server, driven through the hub's proxy over its websocket."""

    def __init__(self, hub: Hub, prefix: str, name: str = "python3") -> None:
        self.hub = hub
        self.prefix = prefix
        response = hub.call("POST", prefix + "api/kernels", {"name": name})
        self.id = response.json()["id"]
        self.session = uuid.uuid4().hex

    def execute(self, code: str, timeout: float = 120) -> dict:
        """Run one cell; return its stdout, stderr, error (ename, evalue) and status."""
        import asyncio

        return asyncio.run(asyncio.wait_for(self._execute(code), timeout))

    async def _execute(self, code: str) -> dict:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        url = (self.hub.url.replace("http://", "ws://") + self.prefix
               + f"api/kernels/{self.id}/channels?session_id={self.session}")
        connection = await websocket_connect(HTTPRequest(url, headers=self.hub._headers()))
        msg_id = uuid.uuid4().hex
        connection.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": self.session,
                       "username": self.hub.user, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        out = {"stdout": "", "stderr": "", "error": None, "status": None, "data": []}
        idle = replied = False
        try:
            while not (idle and replied):
                raw = await connection.read_message()
                if raw is None:
                    raise RuntimeError(f"the kernel's websocket closed; so far: {out}")
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out[content["name"]] += content["text"]
                elif kind == "error":
                    out["error"] = (content["ename"], content["evalue"])
                elif kind in ("execute_result", "display_data"):
                    out["data"].append(content["data"].get("text/plain", ""))
                elif kind == "execute_reply":
                    out["status"] = content["status"]
                    replied = True
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
        finally:
            connection.close()
        return out

    def shutdown(self) -> None:
        self.hub.call("DELETE", self.prefix + f"api/kernels/{self.id}", expect=(204, 404))


SYSTEM_PYTHON = "/usr/bin/python3"


def user_python(uid: int, gid: int) -> str:
    """An interpreter the hub user can run that can use this environment's packages.

    This one if the user may execute it (not so for a Python under ``/root``),
    else the system's, provided it is the same ``major.minor`` (compiled
    modules are shared); anything else is an error that says what to do.
    """
    mine = os.path.realpath(sys.executable)
    version = "{}.{}".format(*sys.version_info[:2])
    check = [mine, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
    for candidate in (mine, SYSTEM_PYTHON):
        check[0] = candidate
        try:
            done = subprocess.run(check, capture_output=True, text=True, timeout=30,
                                  user=uid, group=gid, extra_groups=[], cwd="/")
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    raise RuntimeError(
        f"the hub user cannot run {mine}, and {SYSTEM_PYTHON} is missing or not Python "
        f"{version}: install python3 of that version, or run the tests from an environment "
        "every user can read")


def user_site(base: Path) -> Path:
    """The hub user's Python packages: this environment's, minus tools it does not need.

    The clone (and its ``.venv``) may sit under a directory the user cannot
    traverse, so the packages are linked (or copied) into a world-readable
    directory; ``gvisor_magic`` is copied from the source tree, as an editable
    install points into the clone.
    """
    import sysconfig

    site = base / "site"
    source = Path(sysconfig.get_paths()["purelib"])
    skip = {"kubernetes_validate", "pip", "setuptools", "ruff", "gvisor_magic", "__pycache__"}

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    site.mkdir()
    for entry in source.iterdir():
        if entry.name in skip or entry.name.startswith(("__editable__", "_gvisor_magic")) \
                or entry.name.endswith(".pth"):
            continue
        if entry.is_dir():
            # Compiled bytecode included: the server starts in half the time.
            shutil.copytree(entry, site / entry.name, copy_function=link_or_copy)
        else:
            link_or_copy(str(entry), str(site / entry.name))
    shutil.copytree(ROOT / "gvisor_magic", site / "gvisor_magic",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [site, *site.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o755)
    return site
