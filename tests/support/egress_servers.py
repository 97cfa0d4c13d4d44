"""Local HTTP servers for tests of the network allowlist.

Every server binds only 127.0.0.1 on an ephemeral port, serves from a daemon
thread and records each request it receives (``hits`` and ``headers``), so a
test can tell which requests got through a proxy and in what form.  Nothing
here ever contacts anything but 127.0.0.1.

* ``plain_server``: 200 with a fixed body for any GET/POST/HEAD.
* ``pypi_index``: a PEP 503 simple index serving one pure-Python wheel.
* ``npm_registry``: a registry serving one package (packument + tarball).
* ``git_http``: a bare repository served over smart HTTP by ``git http-backend``.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import html
import io
import json
import os
import re
import subprocess
import tarfile
import threading
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
PAYLOAD = "installed through the allowlist"
README_TEXT = "cloned through the allowlist\n"

# (status, headers, body); the body is dropped for HEAD.
Response = tuple[int, dict[str, str], bytes]
App = Callable[["_Handler", bytes], Response]


@dataclass
class LocalServer:
    host: str
    port: int
    hits: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = field(default=None, repr=False, compare=False)
    _thread: threading.Thread | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _closed: bool = field(default=False, repr=False, compare=False)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    def record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.hits.append(f"{method} {path}")
            self.headers.append(headers)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, record: LocalServer | None = None) -> None:
        super().__init__((HOST, 0), _Handler)
        self.record: LocalServer | None = record
        self.app: App = _not_found

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # quiet: a client hanging up mid-request is no news in these tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    @property
    def route(self) -> str:
        """The request path, decoded, without query or (for absolute URIs) scheme and host."""
        path = urllib.parse.urlsplit(self.path).path if "://" in self.path else self.path
        return urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])

    @property
    def query(self) -> str:
        return urllib.parse.urlsplit(self.path).query

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        record = self.server.record
        if record is not None:
            record.record(self.command, self.path, dict(self.headers.items()))
        try:
            body = self._read_body()
            status, headers, payload = self.server.app(self, body)
        except Exception as error:  # a broken fixture must answer, not hang the client
            status, headers = 500, {"Content-Type": "text/plain"}
            payload = f"{type(error).__name__}: {error}\n".encode()
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


def _not_found(handler: _Handler, body: bytes) -> Response:
    return 404, {"Content-Type": "text/plain"}, b"not found\n"


@contextlib.contextmanager
def _serving(make_app: Callable[[LocalServer], App]) -> Iterator[LocalServer]:
    """Bind, build the app (which may need the port), serve from a daemon thread."""
    httpd = _Server()
    server = LocalServer(host=HOST, port=httpd.server_address[1], _httpd=httpd)
    httpd.record = server
    try:
        httpd.app = make_app(server)
    except BaseException:
        httpd.server_close()
        raise
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"local-server-{server.port}", daemon=True)
    server._thread = thread
    thread.start()
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- plain


@contextlib.contextmanager
def plain_server(body: bytes = b"ok\n") -> Iterator[LocalServer]:
    """Answer 200 with ``body`` to any GET/POST/HEAD on any path."""

    def app(handler: _Handler, request_body: bytes) -> Response:
        return 200, {"Content-Type": "text/plain"}, body

    with _serving(lambda server: app) as server:
        yield server


# --------------------------------------------------------------------------- PyPI


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_digest(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_wheel(workdir: Path, name: str = "gm-egress-probe", version: str = "1.0") -> Path:
    """A pure-Python wheel with one module ``<name>.py`` defining ``VALUE``, built by hand."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}.py": f"VALUE = {PAYLOAD!r}\n".encode(),
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Summary: probe package for the network allowlist tests\n").encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: gvisor-magic-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, data in files.items():
        writer.writerow([path, _record_digest(data), len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    files[f"{info}/RECORD"] = record.getvalue().encode()

    workdir.mkdir(parents=True, exist_ok=True)
    wheel = workdir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            entry = zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data)
    return wheel


@contextlib.contextmanager
def pypi_index(workdir: Path, name: str = "gm-egress-probe",
               version: str = "1.0") -> Iterator[LocalServer]:
    """A PEP 503 simple index at ``/simple/`` serving one wheel of ``name``."""
    wheel = build_wheel(Path(workdir), name, version)
    data = wheel.read_bytes()
    project = _normalize(name)
    wheel_path = f"/packages/{wheel.name}"
    sha256 = hashlib.sha256(data).hexdigest()
    page = ("<!DOCTYPE html>\n<html><head><title>{title}</title></head><body>\n"
            "{links}\n</body></html>\n")
    root = page.format(title="Simple index", links=(
        f'<a href="/simple/{project}/">{html.escape(name)}</a>')).encode()
    listing = page.format(title=f"Links for {html.escape(name)}", links=(
        f'<a href="{wheel_path}#sha256={sha256}">{wheel.name}</a>')).encode()
    html_type = {"Content-Type": "text/html; charset=utf-8"}

    def app(handler: _Handler, body: bytes) -> Response:
        route = handler.route
        if route in ("/simple", "/simple/"):
            return 200, html_type, root
        match = re.fullmatch(r"/simple/([^/]+)/?", route)
        if match and _normalize(match.group(1)) == project:
            return 200, html_type, listing
        if route == wheel_path:
            return 200, {"Content-Type": "application/octet-stream"}, data
        return _not_found(handler, body)

    with _serving(lambda server: app) as server:
        yield server


# --------------------------------------------------------------------------- npm


def build_npm_tarball(workdir: Path, name: str = "gm-egress-probe",
                      version: str = "1.0.0") -> Path:
    """``package/package.json`` and ``package/index.js`` (exporting the payload), gzipped."""
    manifest = {"name": name, "version": version, "main": "index.js",
                "description": "probe package for the network allowlist tests",
                "license": "MIT"}
    files = {
        "package/package.json": (json.dumps(manifest, indent=2) + "\n").encode(),
        "package/index.js": f"module.exports = {json.dumps(PAYLOAD)};\n".encode(),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    tarball = workdir / f"{name.replace('/', '-').lstrip('@')}-{version}.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for path, data in files.items():
            entry = tarfile.TarInfo(path)
            entry.size = len(data)
            entry.mode = 0o644
            entry.mtime = 1577836800  # 2020-01-01
            archive.addfile(entry, io.BytesIO(data))
    return tarball


@contextlib.contextmanager
def npm_registry(workdir: Path, name: str = "gm-egress-probe",
                 version: str = "1.0.0") -> Iterator[LocalServer]:
    """A registry serving the packument at ``/<name>`` and its tarball."""
    tarball = build_npm_tarball(Path(workdir), name, version)
    data = tarball.read_bytes()
    basename = name.rsplit("/", 1)[-1]
    tarball_path = f"/{name}/-/{basename}-{version}.tgz"

    def make_app(server: LocalServer) -> App:
        packument = json.dumps({
            "name": name,
            "dist-tags": {"latest": version},
            "versions": {version: {
                "name": name,
                "version": version,
                "main": "index.js",
                "dist": {
                    "tarball": server.url + tarball_path,
                    "shasum": hashlib.sha1(data).hexdigest(),
                    "integrity": "sha512-" + base64.b64encode(
                        hashlib.sha512(data).digest()).decode(),
                },
            }},
        }).encode()
        json_type = {"Content-Type": "application/json"}

        def app(handler: _Handler, body: bytes) -> Response:
            # npm asks for "/<name>" (scoped names as "/@scope%2fname"), with an Accept
            # header preferring application/vnd.npm.install-v1+json: the full packument
            # is a valid answer to that too.
            route = handler.route
            if route.rstrip("/") == f"/{name}":
                return 200, json_type, packument
            if route == tarball_path:
                return 200, {"Content-Type": "application/octet-stream"}, data
            return _not_found(handler, body)

        return app

    with _serving(make_app) as server:
        yield server


# --------------------------------------------------------------------------- git


def _git_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    env.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_DATE="2020-01-01T00:00:00+0000",
               GIT_COMMITTER_DATE="2020-01-01T00:00:00+0000")
    return env


def build_git_repo(workdir: Path, repo: str = "probe.git") -> Path:
    """A bare repository with one commit on ``main``: a ``README``."""
    bare = Path(workdir) / repo
    bare.parent.mkdir(parents=True, exist_ok=True)
    env = _git_env()

    def git(*args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
             f"--git-dir={bare}", *args],
            input=stdin, env=env, capture_output=True, text=True, check=True, timeout=60)
        return result.stdout.strip()

    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)],
                   env=env, capture_output=True, check=True, timeout=60)
    blob = git("hash-object", "-w", "--stdin", stdin=README_TEXT)
    tree = git("mktree", stdin=f"100644 blob {blob}\tREADME\n")
    commit = git("commit-tree", tree, "-m", "probe")
    git("update-ref", "refs/heads/main", commit)
    git("symbolic-ref", "HEAD", "refs/heads/main")
    return bare


def _parse_cgi(output: bytes) -> Response:
    separator = re.search(rb"\r?\n\r?\n", output)
    if separator is None:
        return 502, {"Content-Type": "text/plain"}, b"bad CGI response\n"
    head, payload = output[:separator.start()], output[separator.end():]
    status, headers = 200, {}
    for line in head.decode("latin-1").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key.lower() == "status":
            status = int(value.split()[0])
        elif key:
            headers[key] = value
    return status, headers, payload


@contextlib.contextmanager
def git_http(workdir: Path, repo: str = "probe.git") -> Iterator[LocalServer]:
    """Serve ``workdir/<repo>`` (created here) over smart HTTP through ``git http-backend``."""
    root = Path(workdir)
    build_git_repo(root, repo)
    base_env = _git_env()

    def app(handler: _Handler, body: bytes) -> Response:
        env = dict(base_env)
        env.update(
            GIT_PROJECT_ROOT=str(root), GIT_HTTP_EXPORT_ALL="1",
            GATEWAY_INTERFACE="CGI/1.1", SERVER_PROTOCOL="HTTP/1.1",
            SERVER_NAME=HOST, SERVER_PORT=str(handler.server.server_address[1]),
            REQUEST_METHOD=handler.command, PATH_INFO=handler.route,
            QUERY_STRING=handler.query, REMOTE_ADDR=handler.client_address[0],
            CONTENT_TYPE=handler.headers.get("Content-Type", ""),
            CONTENT_LENGTH=str(len(body)),
        )
        for key, value in handler.headers.items():  # Git-Protocol, Content-Encoding, ...
            if key.lower() not in ("content-type", "content-length", "transfer-encoding"):
                env["HTTP_" + key.upper().replace("-", "_")] = value
        result = subprocess.run(["git", "http-backend"], input=body, env=env,
                                capture_output=True, timeout=120)
        return _parse_cgi(result.stdout)

    with _serving(lambda server: app) as server:
        yield server
