"""Secrets: what a hostile command tries to read first (tokens, keys, sockets)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

READ_SECRETS = r'''
import glob, json, os, socket, sys

def read(path, size=65536):
    try:
        with open(path, "rb") as handle:
            return handle.read(size).decode("latin-1")
    except OSError as exc:
        return "ERR %s" % type(exc).__name__

def listing(path):
    try:
        return " ".join(sorted(os.listdir(path)))
    except OSError as exc:
        return "ERR %s" % type(exc).__name__

found = {"env": json.dumps(dict(os.environ)), "shadow": read("/etc/shadow"),
         "workdir-keys": read(".ssh/id_ed25519") + read(".netrc"),
         "homes": " ".join(read(p) for p in glob.glob("/home/*/.ssh/*")) + listing("/home"),
         "root": listing("/root") + " ".join(read(p) for p in glob.glob("/root/.*")),
         "k8s": read("/var/run/secrets/kubernetes.io/serviceaccount/token"),
         "proc": "".join(read(d + "/environ") + read(d + "/cmdline")
                         for d in glob.glob("/proc/[0-9]*"))}
try:
    docker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    docker.settimeout(5)
    docker.connect("/var/run/docker.sock")
    docker.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
    found["docker"] = docker.recv(4096).decode("latin-1")
except OSError as exc:
    found["docker"] = "ERR %s" % type(exc).__name__
print(json.dumps(found))
'''


@pytest.fixture
def planted_secrets(tmp_path, monkeypatch):
    """Canary secrets where a real machine keeps them: environment, homes, working dir."""
    secret = f"CANARY-{uuid.uuid4().hex}"
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / ".ssh").mkdir()
    (work / ".ssh" / "id_ed25519").write_text(f"PRIVATE KEY {secret}\n")
    (work / ".netrc").write_text(f"machine example password {secret}\n")
    made: list[Path] = []
    other_home = Path("/home") / f"gvm-probe-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(OSError):
        (other_home / ".ssh").mkdir(parents=True)
        (other_home / ".ssh" / "id_rsa").write_text(f"OTHER USER KEY {secret}\n")
        made.append(other_home)
    own_home = Path(os.path.expanduser("~")) / f".gvm-probe-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(OSError):
        own_home.write_text(f"HOME SECRET {secret}\n")
        made.append(own_home)
    try:
        yield secret, own_home
    finally:
        for path in made:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def test_secrets(probe, planted_secrets, host_canary_process, service_account_token):
    secret, own_home = planted_secrets
    host_process, process_secret = host_canary_process
    result, found = probe.run_python(READ_SECRETS)
    everything = result.stdout + result.stderr
    probe.verdict("host environment variables (JUPYTERHUB_API_TOKEN, AWS_...)",
                  secret in found["env"], found["env"][:200])
    probe.verdict("/etc/shadow", "root:" in found["shadow"], found["shadow"][:80])
    probe.verdict("~/.ssh and .netrc in the working dir", secret in found["workdir-keys"],
                  found["workdir-keys"][:120])
    probe.verdict("other users' homes (/home/*/.ssh)", secret in found["homes"],
                  found["homes"][:120])
    probe.verdict("the caller's own home (~, /root)",
                  own_home.name in found["root"] or secret in found["root"], found["root"][:160])
    probe.verdict("Kubernetes service-account token", service_account_token in found["k8s"],
                  found["k8s"][:80])
    probe.verdict("host processes' /proc/*/environ and cmdline",
                  process_secret in found["proc"], f"{len(found['proc'])} bytes read")
    probe.verdict("the Docker socket", "OK" in found["docker"], found["docker"][:80])
    assert process_secret not in everything or not probe.isolated
    assert host_process.is_running(), "the host process must survive the probe"
