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


#: Scrubbed configuration files, as users write them, each holding credentials in every
#: form its format allows; ``{N}`` becomes a canary of its own (several per file).
SCRUBBED_CONFIGS = {
    ".condarc": (
        "channels:\n"
        "  - https://conda.anaconda.org/t/{0}/private-chan\n"
        "  - defaults\n"
        "channel_alias: https://conda.anaconda.org/t/{1}\n"
        "custom_channels:\n"
        "  internal: https://conda.example.invalid/api/repo?token={2}\n"
        "proxy_servers:\n"
        "  https: http://proxyuser:{3}@127.0.0.1:3128\n"),
    ".npmrc": (
        "registry=https://registry.example.invalid/\n"
        "//registry.example.invalid/:_authToken={0}\n"
        "_auth={1}\n"
        "@corp:registry=https://npmuser:{2}@npm.example.invalid/\n"),
    ".yarnrc": (
        'registry "https://registry.example.invalid/"\n'
        '"//registry.example.invalid/:_authToken" {0}\n'),
    ".yarnrc.yml": (
        "npmRegistryServer: https://npm.example.invalid\n"
        "npmAuthToken: {0}\n"
        "npmScopes:\n"
        "  corp:\n"
        "    npmRegistryServer: https://yarnuser:{1}@npm.example.invalid\n"),
    "pip.conf": (
        "[global]\n"
        "index-url = https://pipuser:{0}@pypi.example.invalid/simple\n"
        "extra-index-url = https://{1}@fury.example.invalid/user/\n"
        "    https://pkgs.example.invalid/simple/?access_token={2}\n"
        "timeout = 60\n"),
    "pip.ini": "[global]\nindex-url = https://pypi.example.invalid/t/{0}/simple\n",
    "proj/.git/config": (
        "[core]\n\trepositoryformatversion = 0\n\tbare = false\n"
        '[remote "origin"]\n\turl = https://oauth2:{0}@git.example.invalid/x.git\n'
        '[url "https://x-access-token:{1}@git.example.invalid/"]\n'
        "\tinsteadOf = https://git.example.invalid/\n"
        '[http "https://git.example.invalid/"]\n\textraHeader = Authorization: Bearer {2}\n'),
}
#: What stays readable (the files are still useful inside).
SCRUBBED_KEEP = {
    ".condarc": "https://conda.anaconda.org/private-chan",
    ".npmrc": "registry=https://registry.example.invalid/",
    ".yarnrc": 'registry "https://registry.example.invalid/"',
    ".yarnrc.yml": "npmRegistryServer: https://npm.example.invalid",
    "pip.conf": "index-url = https://pypi.example.invalid/simple",
    "pip.ini": "index-url = https://pypi.example.invalid/simple",
    "proj/.git/config": "url = https://git.example.invalid/x.git",
}


@pytest.fixture
def scrubbed_configs(probe, monkeypatch) -> dict[str, list[str]]:
    """Every scrubbed kind of file in the working dir, with canary credentials."""
    monkeypatch.delenv("GVISOR_MAGIC_PROTECTED_PATHS", raising=False)
    canaries: dict[str, list[str]] = {}
    for rel, template in SCRUBBED_CONFIGS.items():
        count = template.count("{")
        canaries[rel] = [f"CANARY{index}x{uuid.uuid4().hex}" for index in range(count)]
        path = probe.workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("proj/.git/"):
            for sub in ("objects", "refs/heads", "hooks", "info"):
                (path.parent / sub).mkdir(parents=True, exist_ok=True)
            (path.parent / "HEAD").write_text("ref: refs/heads/main\n")
        path.write_text(template.format(*canaries[rel]))
    return canaries


def test_scrubbed_configuration_shows_no_credentials(probe, scrubbed_configs):
    """Tokens in every scrubbed file (a conda channel's /t/<token>/, ?token= parameters,
    user:password@ URLs, npm/yarn auth lines, git auth headers) are absent from what a
    command inside reads; the rest of each file is there; the result names each file."""
    names = list(SCRUBBED_CONFIGS)
    command = " ".join(f"echo '=== {rel}'; cat '{rel}';" for rel in names)
    result = probe.run(command)
    assert result.returncode == 0, result.describe()
    everything = result.stdout + result.stderr
    scrubbed = [p.strip() for p in result.details.get("scrubbed", "").split(",")]
    for rel, canaries in scrubbed_configs.items():
        shown = everything.split(f"=== {rel}\n", 1)[-1].split("=== ", 1)[0]
        leaked = [c for c in canaries if c in everything]
        probe.verdict(f"credentials in {rel}", bool(leaked),
                      f"{len(leaked)} of {len(canaries)} canaries read: {shown[:160]!r}")
        host = (probe.workdir / rel).read_text()
        assert all(c in host for c in canaries), f"the host's {rel} must be untouched"
        if probe.isolated:
            assert SCRUBBED_KEEP[rel] in shown, (rel, shown)
            assert str(probe.workdir / rel) in scrubbed, (
                f"details['scrubbed'] does not name {rel}: {result.details}")
