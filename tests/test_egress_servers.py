"""The local servers of tests/support/egress_servers.py work from the host, without any proxy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.egress_servers import LocalServer, git_http, npm_registry, plain_server, pypi_index

PAYLOAD = "installed through the allowlist"


def no_proxy_env(**extra: str) -> dict[str, str]:
    """The environment without any *_proxy variable (nor pip's find-links/config)."""
    env = {key: value for key, value in os.environ.items()
           if not key.lower().endswith("_proxy")}
    env.pop("PIP_FIND_LINKS", None)
    env.update(extra)
    return env


def direct_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def raw_request(server: LocalServer, request_line: str) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(f"{request_line}\r\nHost: {server.authority}\r\n"
                     "Connection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_plain_server_answers_and_records() -> None:
    with plain_server() as server:
        assert server.host == "127.0.0.1"
        assert server.authority == f"127.0.0.1:{server.port}"
        assert server.url == f"http://127.0.0.1:{server.port}"
        opener = direct_opener()
        with opener.open(server.url + "/hello?x=1", timeout=10) as response:
            assert response.status == 200
            assert response.read() == b"ok\n"
        request = urllib.request.Request(server.url + "/post", data=b"payload",
                                         headers={"X-Probe": "yes"})
        with opener.open(request, timeout=10) as response:
            assert response.read() == b"ok\n"
        head = urllib.request.Request(server.url + "/head", method="HEAD")
        with opener.open(head, timeout=10) as response:
            assert response.status == 200
            assert response.read() == b""
        # A proxy forwards the absolute-URI form; it is recorded as sent.
        reply = raw_request(server, "GET http://example.invalid/abs HTTP/1.1")
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok\n")
        assert server.hits == ["GET /hello?x=1", "POST /post", "HEAD /head",
                               "GET http://example.invalid/abs"]
        assert len(server.headers) == len(server.hits)
        assert server.headers[1]["X-Probe"] == "yes"
        assert server.headers[3]["Host"] == server.authority


def test_custom_body() -> None:
    with plain_server(b"custom") as server, \
            direct_opener().open(server.url, timeout=10) as response:
        assert response.read() == b"custom"
    assert server.hits == ["GET /"]


def test_close_is_idempotent_and_frees_the_port() -> None:
    with plain_server() as server:
        port = server.port
        server.close()
        server.close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with socket.socket() as sock:  # the port can be bound again
            sock.bind(("127.0.0.1", port))
    server.close()  # and again, after the context manager closed it too


def test_pypi_index_installs_with_pip(tmp_path: Path) -> None:
    target = tmp_path / "target"
    with pypi_index(tmp_path / "index") as server:
        with pytest.raises(urllib.error.HTTPError) as missing:
            direct_opener().open(server.url + "/simple/other/", timeout=10)
        assert missing.value.code == 404
        env = no_proxy_env(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1")
        run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps",
             "--disable-pip-version-check", "--index-url", server.url + "/simple",
             "--target", str(target), "gm-egress-probe"], env, tmp_path)
    assert "GET /simple/gm-egress-probe/" in server.hits
    assert "GET /packages/gm_egress_probe-1.0-py3-none-any.whl" in server.hits
    check = run([sys.executable, "-c", "import gm_egress_probe; print(gm_egress_probe.VALUE)"],
                no_proxy_env(PYTHONPATH=str(target)), tmp_path)
    assert check.stdout.strip() == PAYLOAD


@pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None,
                    reason="npm/node not installed")
def test_npm_registry_installs_with_npm(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    with npm_registry(tmp_path / "registry") as server:
        run(["npm", "install", "--prefix", str(prefix), "--registry", server.url + "/",
             "--no-audit", "--no-fund", "--cache", str(tmp_path / "cache"),
             "gm-egress-probe"], no_proxy_env(), tmp_path)
    assert "GET /gm-egress-probe" in server.hits
    assert "GET /gm-egress-probe/-/gm-egress-probe-1.0.0.tgz" in server.hits
    check = run(["node", "-e", "console.log(require('gm-egress-probe'))"],
                no_proxy_env(), prefix)
    assert check.stdout.strip() == PAYLOAD


def test_git_http_clones(tmp_path: Path) -> None:
    clone = tmp_path / "c"
    with git_http(tmp_path / "repos") as server:
        env = no_proxy_env(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1",
                           GIT_TERMINAL_PROMPT="0")
        run(["git", "clone", "--quiet", server.url + "/probe.git", str(clone)], env, tmp_path)
    assert (clone / "README").read_text() == "cloned through the allowlist\n"
    assert server.hits[0] == "GET /probe.git/info/refs?service=git-upload-pack"
    assert "POST /probe.git/git-upload-pack" in server.hits
