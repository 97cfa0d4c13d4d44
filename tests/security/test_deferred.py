"""Deferred escapes: what a sandboxed command leaves behind to run later on the host.

A command isolated by gVisor cannot touch the host while it runs, but the working
dir is mounted read-write: if it is a home (as on a hosted JupyterHub, where the
kernel's cwd and ``$HOME`` are ``/home/jovyan``), a command can plant a git hook,
an rc file or a Python start-up file that the user's own tools run later, on the
host, unsandboxed. These probes plant every such vector, then run the host tools
that would fire them, the way a user would afterwards. Each payload only creates a
canary file in a host directory no sandbox can see, so a canary that exists
afterwards is proof, observed on the host, that the plant would have run code there.

They also check the other half of the "protected paths" policy: secrets at any
depth of the working dir stay unreadable (also through symlinks, also when they
appear while a session is warm), the policy can be relaxed by name, and the
protection leaves no marks (stand-ins, world-writable dirs) in the user's tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support.host_tools import TOOL_TIMEOUT, run_host_tool

from gvisor_magic import CommandResult, IsolatedSession

PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"

# A Debian skeleton, shortened: .bashrc stops early in non-interactive shells,
# .profile sources .bashrc under bash and puts ~/.local/bin first on PATH.
DEBIAN_BASHRC = """\
# ~/.bashrc: executed by bash(1) for non-login shells.

# If not running interactively, don't do anything
case $- in
    *i*) ;;
      *) return;;
esac

HISTCONTROL=ignoreboth
shopt -s histappend
HISTSIZE=1000
HISTFILESIZE=2000
shopt -s checkwinsize
alias ls='ls --color=auto'
"""
DEBIAN_PROFILE = """\
# ~/.profile: executed by the command interpreter for login shells.

# if running bash
if [ -n "$BASH_VERSION" ]; then
    # include .bashrc if it exists
    if [ -f "$HOME/.bashrc" ]; then
\t. "$HOME/.bashrc"
    fi
fi

# set PATH so it includes user's private bin if it exists
if [ -d "$HOME/bin" ] ; then
    PATH="$HOME/bin:$PATH"
fi

# set PATH so it includes user's private bin if it exists
if [ -d "$HOME/.local/bin" ] ; then
    PATH="$HOME/.local/bin:$PATH"
fi
"""

# Runs in the sandbox (or, for the harness check, on the host) with the home as
# cwd: plants every vector. argv: the host dir canaries go to, the host Python's
# X.Y, a tag. Prints {written path: "ok ..." | "ERR ..."} as JSON.
PLANT = r'''
import json, os, subprocess, sys
scratch, pyver, tag = sys.argv[1:4]
found = {}

def sh(name):
    return "touch '%s'" % os.path.join(scratch, name)

def py(name):
    return "open(%r, 'w').close()\n" % os.path.join(scratch, name)

def hook(name):
    return "#!/bin/sh\n%s\n" % sh(name)

def write(path, text, mode="w", executable=False):
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, mode) as handle:
        handle.write(text)
    if executable:
        os.chmod(path, 0o755)

def attempt(key, action):
    try:
        value = action()
        found[key] = "ok %s" % (value or "")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        found[key] = "ERR %s: %s" % (type(exc).__name__, exc)

def fsmonitor(name):
    return '[core]\n\tfsmonitor = "%s; true"\n' % sh(name)

def git(*args):
    subprocess.run(["git", *args], check=True, capture_output=True, timeout=60)

def new_repo():
    path = "a/b/newrepo"
    os.makedirs(path, exist_ok=True)
    try:
        git("init", "-q", path)
        git("-C", path, "config", "core.fsmonitor", "%s; true" % sh("newrepo-fsmonitor"))
        how = "with the sandbox's git"
    except (OSError, subprocess.SubprocessError):
        for sub in ("objects", "refs/heads", "refs/tags", "hooks"):
            os.makedirs(os.path.join(path, ".git", sub), exist_ok=True)
        write(path + "/.git/HEAD", "ref: refs/heads/main\n")
        write(path + "/.git/config", "[core]\n\trepositoryformatversion = 0\n\tbare = false\n"
              + fsmonitor("newrepo-fsmonitor").split("\n", 1)[1])
        how = "by hand"
    write(path + "/.git/hooks/pre-commit", hook("newrepo-hook"), executable=True)
    return how

def configured_repo(path, settings):
    """A new repository whose config holds ``settings`` ((dotted key, value) pairs)."""
    os.makedirs(path, exist_ok=True)
    try:
        git("init", "-q", path)
        for key, value in settings:
            git("-C", path, "config", key, value)
        return "with the sandbox's git"
    except (OSError, subprocess.SubprocessError):
        for sub in ("objects", "refs/heads", "refs/tags"):
            os.makedirs(os.path.join(path, ".git", sub), exist_ok=True)
        write(path + "/.git/HEAD", "ref: refs/heads/main\n")
        text = "[core]\n\trepositoryformatversion = 0\n\tbare = false\n"
        for key, value in settings:
            section, _, name = key.rpartition(".")
            section, _, sub = section.partition(".")
            text += '[%s%s]\n\t%s = "%s"\n' % (section, ' "%s"' % sub if sub else "", name, value)
        write(path + "/.git/config", text)
        return "by hand"

def bytecode(text, mtime=0, size=0, unchecked_for=None):
    """A .pyc of this Python running ``text``: timestamp-based (mtime, size), or an
    unchecked hash-based one (loaded whatever its source says)."""
    import importlib._bootstrap_external as external, importlib.util
    code = compile(text, "planted", "exec")
    if unchecked_for is not None:
        with open(unchecked_for, "rb") as handle:
            digest = importlib.util.source_hash(handle.read())
        return bytes(external._code_to_hash_pyc(code, digest, checked=False))
    return bytes(external._code_to_timestamp_pyc(code, mtime, size))

def cached_beside(source, canary, unchecked=False):
    """__pycache__ bytecode for an existing source, header matching it, payload not."""
    import importlib.util
    info = os.stat(source)
    data = bytecode(py(canary), int(info.st_mtime), info.st_size,
                    unchecked_for=source if unchecked else None)
    target = importlib.util.cache_from_source(os.path.abspath(source))
    write(target, data, "wb")
    return os.path.relpath(target)

attempt("proj/src.txt", lambda: write("proj/src.txt", "ordinary work\n"))
attempt("notes.txt", lambda: write("notes.txt", "ordinary notes\n"))
attempt("proj/.git/config", lambda: write("proj/.git/config", fsmonitor("fsmonitor-proj"), "a"))
attempt("proj/.git/hooks/post-checkout", lambda: write(
    "proj/.git/hooks/post-checkout", hook("hook-post-checkout"), executable=True))
attempt("proj/.git/hooks/pre-commit", lambda: write(
    "proj/.git/hooks/pre-commit", hook("hook-pre-commit"), executable=True))
attempt(".gitconfig", lambda: write(".gitconfig", fsmonitor("gitconfig-fsmonitor"), "a"))
attempt(".bashrc", lambda: write(".bashrc", "\n%s\n" % sh("bashrc"), "a"))
attempt(".profile", lambda: write(".profile", "\n%s\n" % sh("profile"), "a"))
attempt(".bash_profile", lambda: write(".bash_profile", "%s\n" % sh("bash-profile"), "a"))
attempt(".ipython/profile_default/startup/00-x.py", lambda: write(
    ".ipython/profile_default/startup/00-x.py", py("ipython-startup")))
attempt(".ipython/profile_default/ipython_config.py", lambda: write(
    ".ipython/profile_default/ipython_config.py", py("ipython-config"), "a"))
attempt(".jupyter/jupyter_server_config.py", lambda: write(
    ".jupyter/jupyter_server_config.py", py("jupyter-config"), "a"))
attempt(".local/lib/python%s/site-packages/x.pth" % pyver, lambda: write(
    ".local/lib/python%s/site-packages/x.pth" % pyver, "import os; " + py("user-site-pth")))
attempt(".local/bin/git", lambda: write(".local/bin/git", hook("local-bin-git"),
                                        executable=True))
attempt(".ssh/authorized_keys", lambda: write(
    ".ssh/authorized_keys", "ssh-ed25519 AAAAplanted%s attacker\n" % tag, "a"))
attempt("sitecustomize.py", lambda: write("sitecustomize.py", py("sitecustomize")))
attempt("a/b/newrepo", new_repo)
attempt("json.py", lambda: write("json.py", py("json-shadow")))
attempt("colorsys.pyc", lambda: write("colorsys.pyc", bytecode(py("sourceless-module")), "wb"))
attempt("xmlrpc/__init__.pyc", lambda: write(
    "xmlrpc/__init__.pyc", bytecode(py("sourceless-package")), "wb"))
attempt("__pycache__/gvm_user_mod", lambda: cached_beside("gvm_user_mod.py", "pycache-timestamp"))
attempt("__pycache__/gvm_user_mod2", lambda: cached_beside("gvm_user_mod2.py",
                                                           "pycache-unchecked", unchecked=True))
attempt("a/b/gpgrepo", lambda: configured_repo("a/b/gpgrepo", [
    ("gpg.format", "ssh"), ("commit.gpgsign", "true"),
    # git splits this command line itself (no shell): a plain argv.
    ("gpg.ssh.defaultKeyCommand", "touch %s" % os.path.join(scratch, "gpg-ssh-keycommand"))]))
attempt("a/b/trailerrepo", lambda: configured_repo("a/b/trailerrepo", [
    ("trailer.x.command", sh("trailer-command"))]))
attempt("a/b/trailercmd", lambda: configured_repo("a/b/trailercmd", [
    ("trailer.y.cmd", sh("trailer-cmd"))]))
print(json.dumps(found))
'''

#: canary -> (what the sandbox wrote, the verdict's name)
VECTORS = {
    "fsmonitor-proj": ("proj/.git/config",
                       "git fsmonitor in an existing repo's .git/config"),
    "hook-post-checkout": ("proj/.git/hooks/post-checkout",
                           "git post-checkout hook in an existing repo"),
    "hook-pre-commit": ("proj/.git/hooks/pre-commit", "git pre-commit hook in an existing repo"),
    "gitconfig-fsmonitor": (".gitconfig", "a new ~/.gitconfig (core.fsmonitor in every repo)"),
    "bashrc": (".bashrc", "~/.bashrc appended (interactive bash)"),
    "profile": (".profile", "~/.profile appended (login sh)"),
    "bash-profile": (".bash_profile", "a new ~/.bash_profile (bash -l)"),
    "ipython-startup": (".ipython/profile_default/startup/00-x.py",
                        "an IPython profile startup file"),
    "ipython-config": (".ipython/profile_default/ipython_config.py",
                       "an IPython profile config file"),
    "jupyter-config": (".jupyter/jupyter_server_config.py", "~/.jupyter/jupyter_server_config.py"),
    "user-site-pth": (f".local/lib/python{PYVER}/site-packages/x.pth",
                      "a .pth in the user site-packages"),
    "local-bin-git": (".local/bin/git", "~/.local/bin/git shadowing git (on .profile's PATH)"),
    "sitecustomize": ("sitecustomize.py", "sitecustomize.py in the working dir (on PYTHONPATH)"),
    "newrepo-fsmonitor": ("a/b/newrepo", "git fsmonitor in a repo the command created"),
    "newrepo-hook": ("a/b/newrepo", "a git hook in a repo the command created"),
    "json-shadow": ("json.py", "json.py in the kernel's cwd shadowing the stdlib"),
    "sourceless-module": ("colorsys.pyc", "a sourceless colorsys.pyc in the kernel's cwd"),
    "sourceless-package": ("xmlrpc/__init__.pyc",
                           "a sourceless package (xmlrpc/__init__.pyc) in the kernel's cwd"),
    "pycache-timestamp": ("__pycache__/gvm_user_mod",
                          "__pycache__ bytecode for the user's module, header matching it"),
    "pycache-unchecked": ("__pycache__/gvm_user_mod2",
                          "unchecked hash-based __pycache__ bytecode for the user's module"),
    "gpg-ssh-keycommand": ("a/b/gpgrepo",
                           "gpg.ssh.defaultKeyCommand in a new repo (git commit, gpgsign)"),
    "trailer-command": ("a/b/trailerrepo",
                        "trailer.<x>.command in a new repo (git interpret-trailers)"),
    "trailer-cmd": ("a/b/trailercmd", "trailer.<x>.cmd in a new repo (git interpret-trailers)"),
}
#: The user's own modules in the home, imported later by a new kernel or Python.
USER_MODULES = ("gvm_user_mod", "gvm_user_mod2")
#: What the host's later Python imports (each a planted bytecode vector above).
HOST_IMPORTS = "import colorsys, xmlrpc, " + ", ".join(USER_MODULES)

LOAD_SERVER_CONFIG = ("from jupyter_server.serverapp import ServerApp; "
                      "ServerApp().load_config_file()")
QUARANTINE_ENTRY = re.compile(r"^(?P<original>.+?) -> (?P<copy>.+?) \((?P<why>.+)\)$")


# -- the home, the host tools -----------------------------------------------------------------


def host_env(home: Path, ceiling: Path, **extra: str) -> dict[str, str]:
    """The minimal environment of a user's later shell on the host."""
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CEILING_DIRECTORIES": str(ceiling), "LANG": "C.UTF-8", **extra}


def host_git(home: Path, *args: str, cwd: Path | None = None) -> None:
    subprocess.run(["git", *args], cwd=cwd or home, env=host_env(home, home.parent),
                   stdin=subprocess.DEVNULL, capture_output=True, check=True,
                   timeout=TOOL_TIMEOUT)


def make_home(home: Path, *, ipython: bool = True, repo: str | None = "proj") -> None:
    """A hosted-JupyterHub-like home: Debian rc files, a git project, an IPython profile."""
    (home / ".bashrc").write_text(DEBIAN_BASHRC)
    (home / ".profile").write_text(DEBIAN_PROFILE)
    if ipython:
        (home / ".ipython" / "profile_default").mkdir(parents=True)
    if repo is not None:
        make_repo(home, repo)
    for name in USER_MODULES:
        (home / f"{name}.py").write_text("VALUE = 1\n")


def make_repo(home: Path, name: str) -> Path:
    """A git project made by the host's real git, with one commit."""
    repo = home / name
    host_git(home, "-c", "init.defaultBranch=main", "init", "-q", name)
    (repo / "README.md").write_text("# a project\n")
    host_git(home, "-C", name, "add", "README.md")
    host_git(home, "-C", name, "-c", "user.name=Probe", "-c", "user.email=probe@example.invalid",
             "commit", "-q", "-m", "init")
    return repo


def interpreters() -> list[str]:
    """The kernel's Python and, when that is a venv (no user site), the Python under it."""
    found = [sys.executable]
    base = Path(sys.base_prefix) / "bin" / f"python{PYVER}"
    if sys.prefix != sys.base_prefix and base.exists():
        found.append(str(base))
    return found


def fire_host_tools(home: Path, elsewhere: Path) -> list[str]:
    """What a user runs on the host later, in their home: each would fire a planted vector.

    ``elsewhere`` is a host dir outside the home (cwd for tools that must not import
    the planted ``json.py``; holds a fresh repo that picks up ``~/.gitconfig``).
    """
    env = host_env(home, elsewhere.parent, PYTHONUSERBASE=str(home / ".local"))
    identity = ["-c", "user.name=Host", "-c", "user.email=host@example.invalid"]
    fresh = elsewhere / "fresh-repo"
    log = [
        run_host_tool(["git", "-C", "proj", "status"], cwd=home, env=env),
        run_host_tool(["git", "-C", "proj", "checkout", "-q", "-b", "gvm-x"], cwd=home, env=env),
        run_host_tool(["git", "-C", "proj", *identity, "commit", "-q", "--allow-empty", "-m",
                       "host"], cwd=home, env=env),
        run_host_tool(["git", "-C", "a/b/newrepo", "status"], cwd=home, env=env),
        run_host_tool(["git", "-C", "a/b/newrepo", *identity, "commit", "-q", "--allow-empty",
                       "-m", "host"], cwd=home, env=env),
        run_host_tool(["git", "-C", "a/b/gpgrepo", *identity, "commit", "-q", "--allow-empty",
                       "-m", "host"], cwd=home, env=env),
        run_host_tool(["git", "-C", "a/b/trailerrepo", "interpret-trailers"], cwd=home, env=env),
        run_host_tool(["git", "-C", "a/b/trailercmd", "interpret-trailers", "--trailer", "y=1"],
                      cwd=home, env=env),
        run_host_tool(["git", "init", "-q", str(fresh)], cwd=elsewhere, env=env),
        run_host_tool(["git", "-C", str(fresh), "status"], cwd=elsewhere, env=env),
        run_host_tool(["bash", "-l", "-c", "true"], cwd=home, env=env),
        run_host_tool(["sh", "-l", "-c", "git --version"], cwd=home, env=env),
        run_host_tool(["bash", "-i", "-c", "true"], cwd=home, env=env),
    ]
    for python in interpreters():
        log.append(run_host_tool([python, "-c", "import json"], cwd=home,
                                 env={**env, "PYTHONPATH": str(home)}))
        log.append(run_host_tool([python, "-c", HOST_IMPORTS], cwd=home,
                                 env={**env, "PYTHONPATH": str(home)}))
    log.append(run_host_tool([sys.executable, "-m", "IPython", f"--ipython-dir={home}/.ipython",
                              "-c", "pass"], cwd=elsewhere, env=env))
    log.append(run_host_tool([sys.executable, "-c", LOAD_SERVER_CONFIG], cwd=elsewhere, env=env))
    return log


def quarantine_entries(result: CommandResult) -> list[tuple[str, str, str]]:
    """``details["quarantined"]`` as (original, quarantined copy, why) triples."""
    text = result.details.get("quarantined", "")
    entries = []
    for part in filter(None, text.split("; ")):
        match = QUARANTINE_ENTRY.match(part)
        assert match, f"a quarantine entry is not 'ORIGINAL -> COPY (why)': {part!r}"
        entries.append((match["original"], match["copy"], match["why"]))
    return entries


# -- snapshots ------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: relative path -> (type, mode, owner, size, sha256 / target)."""
    entries: dict[str, tuple] = {}

    def record(path: str, rel: str) -> None:
        info = os.lstat(path)
        owner = (info.st_uid, info.st_gid)
        if stat.S_ISLNK(info.st_mode):
            entries[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            entries[rel] = ("dir", oct(info.st_mode), owner)
        elif stat.S_ISREG(info.st_mode):
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            entries[rel] = ("file", oct(info.st_mode), owner, info.st_size, digest)
        else:
            entries[rel] = ("other", oct(info.st_mode), owner)

    record(str(root), ".")
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            record(path, os.path.relpath(path, root))
    return entries


def world_writable_dirs(root: Path) -> list[str]:
    """Directories under root (root included) that anyone on the host may write into."""
    found = [str(root)] if os.lstat(root).st_mode & stat.S_IWOTH else []
    for directory, dirs, _files in os.walk(root):
        for name in dirs:
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(path)
                if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_IWOTH:
                    found.append(f"{path} {oct(info.st_mode)}")
    return found


def snapshot_diff(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, list[str]]:
    return {"added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(k for k in before.keys() & after.keys() if before[k] != after[k])}


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def jupyterhub_home(probe, tmp_path, monkeypatch) -> Path:
    """The probe's workdir is the user's home, the kernel's cwd and $HOME, as on a
    hosted JupyterHub; quarantined files go to a pytest tmp dir."""
    monkeypatch.setenv("HOME", str(probe.workdir))
    monkeypatch.setenv("GVISOR_MAGIC_QUARANTINE_DIR", str(tmp_path / "quarantine"))
    monkeypatch.delenv("GVISOR_MAGIC_PROTECTED_PATHS", raising=False)
    monkeypatch.chdir(probe.workdir)
    return probe.workdir


def open_session(probe, **kwargs) -> None:
    """Give the probe a session made with extra arguments (the fixture still closes it)."""
    assert probe.session is None
    probe.session = IsolatedSession(probe.workdir, mode=probe.backend, limits=probe.limits,
                                    max_output=probe.max_output, writes=probe.writes, **kwargs)


# -- the harness itself -------------------------------------------------------------------------


def test_the_host_tools_fire_every_planted_vector(tmp_path, host_scratch):
    """Harness check: planted unsandboxed, every vector fires under the host tools used below.

    Without this, a payload or tool that silently never fires would read as
    "blocked" on gVisor. Here nothing is sandboxed: every canary must appear.
    """
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    make_home(home)
    planted = subprocess.run([sys.executable, "-c", PLANT, str(host_scratch), PYVER, "tag"],
                             cwd=home, env=host_env(home, tmp_path), stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=True)
    found = json.loads(planted.stdout.strip().splitlines()[-1])
    assert all(value.startswith("ok") for value in found.values()), found
    assert not list(host_scratch.iterdir()), "planting alone must not fire anything"
    log = fire_host_tools(home, elsewhere)
    missing = [name for name in VECTORS if not (host_scratch / name).exists()]
    assert not missing, f"these vectors did not fire on the host: {missing}\n" + "\n".join(log)
    assert "AAAAplantedtag" in (home / ".ssh" / "authorized_keys").read_text()


# -- the probes -----------------------------------------------------------------------------


def test_planted_code_never_runs_later_on_the_host(probe, jupyterhub_home, host_scratch,
                                                   tmp_path):
    """Nothing a sandboxed command writes in a home runs later when the user's own tools do.

    One command tries every vector (git config and hooks, rc files, IPython and
    Jupyter config, a user-site .pth, ~/.local/bin, authorized_keys,
    sitecustomize.py, a new repo, a module shadowing json); then git, bash, sh,
    Python, IPython and Jupyter run on the host. Ordinary files still get written.
    """
    home = jupyterhub_home
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_home(home)
    result, found = probe.run_python(PLANT, str(host_scratch), PYVER, probe.tag)
    during = sorted(p.name for p in host_scratch.iterdir())
    log = fire_host_tools(home, elsewhere)
    evidence_log = " | ".join(log)
    for canary, (written, name) in VECTORS.items():
        fired = (host_scratch / canary).exists()
        when = " (fired during the command itself)" if canary in during else ""
        probe.verdict(name, fired, f"inside: {found.get(written, '?')}; "
                      f"canary on the host: {fired}{when}")
    keys = home / ".ssh" / "authorized_keys"
    planted_key = keys.is_file() and f"AAAAplanted{probe.tag}" in keys.read_text()
    probe.verdict("~/.ssh/authorized_keys planted", planted_key,
                  f"inside: {found['.ssh/authorized_keys']}; on the host: "
                  f"{'planted key present' if planted_key else 'no planted key'}")

    # Ordinary writes still work, on every backend.
    assert found["proj/src.txt"].startswith("ok"), found
    assert found["notes.txt"].startswith("ok"), found
    assert (home / "proj" / "src.txt").read_text() == "ordinary work\n"
    assert (home / "notes.txt").read_text() == "ordinary notes\n"

    if probe.isolated:
        # What no mount could prevent was written, then moved away after the command,
        # and the result says where it went.
        entries = quarantine_entries(result)
        quarantine = (tmp_path / "quarantine").resolve()
        for what in ("sitecustomize.py", "json.py", "a/b/newrepo", "colorsys.pyc",
                     "xmlrpc/__init__.pyc", "__pycache__/gvm_user_mod.",
                     "__pycache__/gvm_user_mod2.", "a/b/gpgrepo/.git/config",
                     "a/b/trailerrepo/.git/config", "a/b/trailercmd/.git/config"):
            assert any(what in original for original, _copy, _why in entries), (
                f"{what} is not in details['quarantined']: {result.details}\n{evidence_log}")
        for original, copy, why in entries:
            assert Path(copy).exists(), f"the quarantined copy of {original} is missing: {copy}"
            assert Path(copy).resolve().is_relative_to(quarantine), (copy, quarantine)
            assert why.strip(), original
        assert not (home / "sitecustomize.py").exists()
        assert not (home / "json.py").exists()
        assert not (home / "colorsys.pyc").exists()
        assert not (home / "xmlrpc" / "__init__.pyc").exists()
        # The user's modules themselves are untouched.
        for name in USER_MODULES:
            assert (home / f"{name}.py").read_text() == "VALUE = 1\n"


SECRET_FILES = {  # relative path -> the verdict's name
    "sub/.ssh/id_ed25519": "a private key in a nested sub/.ssh",
    "project2/.env": ".env in a subproject",
    "project2/.env.production": ".env.* in a subproject",
    ".cache/huggingface/token": "Hugging Face token (.cache/huggingface/token)",
    ".huggingface/token": "Hugging Face token (.huggingface/token)",
    ".kaggle/kaggle.json": "Kaggle API key (.kaggle/kaggle.json)",
    ".config/gh/hosts.yml": "GitHub CLI token (.config/gh/hosts.yml)",
    ".pgpass": "PostgreSQL password file (.pgpass)",
    ".vault-token": "Vault token (.vault-token)",
    ".local/share/jupyter/runtime/kernel-abc.json": "a Jupyter kernel connection file",
    ".local/share/jupyter/runtime/jpserver-1.json": "a Jupyter server file (its token)",
}

READ_EVERYTHING = r'''
import json, os, subprocess, sys
found = {}

def read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read(65536).decode("latin-1")
    except OSError as exc:
        return "ERR %s" % type(exc).__name__

for path in sys.argv[1:]:
    found[path] = read(path)
walked = []
for directory, dirs, files in os.walk("."):
    for name in files:
        walked.append(read(os.path.join(directory, name)))
found["walk"] = "\n".join(walked)
found["env"] = json.dumps(dict(os.environ))
try:
    version = subprocess.run(["git", "--version"], capture_output=True, text=True, timeout=60)
    found["git-version"] = version.stdout.strip()
    remote = subprocess.run(["git", "-C", "proj", "remote", "-v"], capture_output=True,
                            text=True, timeout=60)
    found["git-remote"] = "%d %s %s" % (remote.returncode, remote.stdout, remote.stderr)
except (OSError, subprocess.SubprocessError) as exc:
    found["git-version"] = "ERR %s" % type(exc).__name__
print(json.dumps(found))
'''


def test_secrets_at_any_depth_stay_unreadable(probe, jupyterhub_home, monkeypatch):
    """Credentials anywhere in the working dir, a token in a repo's remote URL, and a
    host variable that only looks like a locale are never readable by a sandboxed command;
    git inside still works, and the host's own files are untouched."""
    home = jupyterhub_home
    make_home(home, ipython=False)
    canaries = {}
    for rel in SECRET_FILES:
        canary = f"CANARY-{uuid.uuid4().hex}"
        canaries[rel] = canary
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"secret = {canary}\n")
    (home / "project2" / ".env.example").write_text("EXAMPLE_VISIBLE=not-a-secret\n")
    url_token = f"CANARY-{uuid.uuid4().hex}"
    host_git(home, "-C", "proj", "remote", "add", "origin",
             f"https://user:{url_token}@example.invalid/x.git")
    env_token = f"CANARY-{uuid.uuid4().hex}"
    monkeypatch.setenv("LC_AUDIT_TOKEN", env_token)
    host_config = (home / "proj" / ".git" / "config").read_text()

    result, found = probe.run_python(READ_EVERYTHING, *SECRET_FILES, "project2/.env.example",
                                     "proj/.git/config")
    everything = result.stdout + result.stderr
    for rel, name in SECRET_FILES.items():
        probe.verdict(name, canaries[rel] in everything, found[rel][:100])
    probe.verdict("a token in a repo's remote URL (.git/config, git remote -v)",
                  url_token in everything,
                  f"config: {found['proj/.git/config'][-120:]!r}; "
                  f"remote -v: {found.get('git-remote', '')[:120]!r}")
    probe.verdict("a host variable named like a locale (LC_AUDIT_TOKEN)",
                  env_token in everything, found["env"][:200])

    assert (home / "proj" / ".git" / "config").read_text() == host_config, (
        "the host's .git/config must be untouched (scrubbed only as the sandbox sees it)")
    for rel, canary in canaries.items():
        assert canary in (home / rel).read_text(), f"the host's {rel} must be untouched"
    if probe.isolated:
        assert "EXAMPLE_VISIBLE=not-a-secret" in found["project2/.env.example"], (
            ".env.example is not a secret: it stays readable")
        if found["git-version"].startswith("git version"):
            remote = found["git-remote"]
            assert remote.startswith("0 "), f"git remote -v must still work inside: {remote}"
            assert "example.invalid/x.git" in remote, remote
        masked = [m.strip() for m in result.details.get("masked_secrets", "").split(",")]
        for rel in SECRET_FILES:
            absolute = str(home / rel)
            assert any(absolute == m or absolute.startswith(m.rstrip("/") + "/")
                       or rel == m or rel.startswith(m.rstrip("/") + "/")
                       for m in masked if m), f"{rel} not in masked_secrets: {masked}"


def test_a_stow_style_ssh_symlink_still_runs_and_hides_the_key(probe, jupyterhub_home):
    """With ~/.ssh a symlink to a folder of the user's dotfiles inside the home (GNU
    stow), the sandbox still starts on the requested backend, and the key stays hidden
    through both paths; the link and the key are left as they were."""
    home = jupyterhub_home
    make_home(home, ipython=False, repo=None)
    canary = f"CANARY-{uuid.uuid4().hex}"
    key_dir = home / "dotfiles" / "ssh"
    key_dir.mkdir(parents=True)
    (key_dir / "id_ed25519").write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{canary}\n")
    (home / ".ssh").symlink_to("dotfiles/ssh")
    script = ("import json, os\n"
              "def read(p):\n"
              "    try:\n"
              "        return open(p).read()\n"
              "    except OSError as exc:\n"
              "        return 'ERR %s' % type(exc).__name__\n"
              "print(json.dumps({'link': read('.ssh/id_ed25519'),"
              " 'target': read('dotfiles/ssh/id_ed25519'), 'ran': os.uname().release}))\n")
    result, found = probe.run_python(script)
    assert result.backend == probe.backend and result.isolated is probe.isolated
    assert result.returncode == 0, result.describe()
    probe.verdict("a private key behind a stow-style ~/.ssh symlink",
                  canary in result.stdout + result.stderr,
                  f"via .ssh: {found['link'][:80]!r}; via dotfiles: {found['target'][:80]!r}")
    assert (home / ".ssh").is_symlink() and os.readlink(home / ".ssh") == "dotfiles/ssh"
    assert canary in (key_dir / "id_ed25519").read_text()


NO_MARKS_COMMAND = """\
echo legit > out.txt
echo gvm-walk-now
sleep 1
mkdir -p .ipython && echo x > .ipython/x
mkdir -p .local/bin && echo y > .local/bin/y
mkdir -p .config/autostart && echo z > .config/autostart/z.desktop
echo done
"""
ATTEMPTED = (".ipython/x", ".local/bin/y", ".config/autostart/z.desktop")


def test_protection_leaves_no_marks_in_the_home(probe, jupyterhub_home):
    """After a command (or after its session closes) the user's home holds exactly what
    the command legitimately wrote: no stand-ins for missing protected dirs, no new
    world-writable directory; none is world-writable while the sandbox is up either."""
    home = jupyterhub_home
    make_home(home, ipython=False)
    before = snapshot(home)
    writable_seen: list[str] = []

    def walk_while_running(stream: str, text: str) -> None:
        if "gvm-walk-now" in text:
            writable_seen.extend(world_writable_dirs(home))

    first = probe.run(NO_MARKS_COMMAND, on_output=walk_while_running)
    assert "gvm-walk-now" in first.stdout and "done" in first.stdout, first.describe()
    if probe.flavour == "session":
        writable_seen.extend(world_writable_dirs(home))  # warm, between two commands
        second = probe.run("cat out.txt")
        assert second.stdout == "legit\n", second.describe()
        writable_seen.extend(world_writable_dirs(home))
        assert probe.session is not None
        probe.session.close()
    assert (home / "out.txt").read_text() == "legit\n"

    planted = [rel for rel in ATTEMPTED if (home / rel).exists()]
    probe.verdict("writes into missing protected dirs of a home (.ipython, .local/bin, "
                  ".config/autostart)", bool(planted), f"on the host afterwards: {planted}")
    probe.verdict("world-writable directories in the home while the sandbox is up",
                  bool(writable_seen), ", ".join(sorted(set(writable_seen)))[:300])
    diff = snapshot_diff(before, snapshot(home))
    legitimate = {"out.txt"}
    if not probe.isolated:  # what the unsandboxed command really wrote, parents included
        for rel in planted:
            parts = Path(rel).parts
            legitimate.update(str(Path(*parts[:n])) for n in range(1, len(parts) + 1))
    marks = {key: [p for p in paths if p not in legitimate] for key, paths in diff.items()}
    probe.verdict("marks left in the home (stand-ins, modes, changed files)",
                  any(marks.values()), json.dumps(marks))
    if probe.isolated:
        assert diff == {"added": ["out.txt"], "removed": [], "changed": []}, diff
        assert not writable_seen, writable_seen


def test_a_secret_created_while_the_session_is_warm_is_hidden(probe, jupyterhub_home):
    """A credential that appears in the home between two commands of a warm session is
    hidden from the next command, which says its sandbox was replaced."""
    if probe.flavour != "session":
        pytest.skip("only a warm session outlives the moment a secret appears; a one-shot "
                    "sandbox is laid out anew for every command")
    home = jupyterhub_home
    make_home(home, ipython=False, repo=None)
    first = probe.run("echo first")
    assert first.stdout == "first\n", first.describe()
    assert probe.session is not None
    was_warm = probe.session.state == "warm"
    canary = f"CANARY-{uuid.uuid4().hex}"
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = {canary}\n")
    second = probe.run("cat .aws/credentials; ls -la .aws; echo second-ran")
    assert "second-ran" in second.stdout, second.describe()
    probe.verdict("a secret created while the session is warm (.aws/credentials)",
                  canary in second.stdout + second.stderr, second.stdout[:200])
    assert canary in (home / ".aws" / "credentials").read_text()
    if probe.isolated:
        assert was_warm, f"a gVisor session must be warm: {probe.session.state}"
        note = second.details.get("session_note", "")
        assert re.search(r"replac|restart|fresh|new sandbox", note, re.IGNORECASE), (
            f"the result must say the sandbox was replaced: {second.details}")


def test_a_warm_session_in_a_home_keeps_its_sandbox(probe, jupyterhub_home):
    """Stand-ins and hidden paths do not make a session replace its sandbox at every
    command: in a home whose .ssh, .ipython, .gitconfig are missing, /tmp carries over and
    no session note appears (the replacement is only for paths that really changed)."""
    if probe.flavour != "session" or not probe.isolated:
        pytest.skip("a warm gVisor session is what keeps a sandbox between commands")
    make_home(jupyterhub_home, ipython=False)
    results = [probe.run("echo kept >> /tmp/carried; wc -l < /tmp/carried") for _ in range(3)]
    assert [r.stdout.strip() for r in results] == ["1", "2", "3"], [r.describe() for r in results]
    assert len({r.details["session"] for r in results}) == 1
    assert not any("session_note" in r.details for r in results), results[-1].details


def test_relaxing_a_protected_path_by_name(probe, jupyterhub_home):
    """``protected_paths=["-.bashrc"]`` lets a sandboxed command edit ~/.bashrc (and the
    result says so) while every other protection, e.g. ~/.profile, stays in force."""
    home = jupyterhub_home
    make_home(home, ipython=False, repo=None)
    profile_before = (home / ".profile").read_text()
    command = ("echo '# relaxed-ok' >> .bashrc; echo '# should-not-land' >> .profile; "
               "echo ran")
    kwargs = {}
    if probe.flavour == "session":
        open_session(probe, protected_paths=["-.bashrc"])
    else:
        kwargs["protected_paths"] = ["-.bashrc"]
    result = probe.run(command, **kwargs)
    assert "ran" in result.stdout, result.describe()
    assert (home / ".bashrc").read_text().endswith("# relaxed-ok\n"), (
        f"a relaxed .bashrc must be writable: {result.describe()}\n{result.stderr}")
    profile_changed = (home / ".profile").read_text() != profile_before
    probe.verdict("relaxing .bashrc keeps ~/.profile protected", profile_changed,
                  (home / ".profile").read_text()[-60:])
    if probe.isolated:
        assert ".bashrc" in result.details.get("relaxed_protection", ""), result.details


def test_too_much_to_protect_is_refused_never_run_elsewhere(tmp_path, runsc_works):
    """More credentials than a sandbox can hide (each a bind mount): the command is refused
    with a clear error, and it never runs, on gVisor or on the host (auto mode)."""
    from gvisor_magic import run_command_isolated
    from gvisor_magic.protected import MAX_PROTECTED_BINDS, ProtectionError

    work = tmp_path / "crowded"
    for index in range(MAX_PROTECTED_BINDS + 10):
        (work / f"p{index}").mkdir(parents=True)
        (work / f"p{index}" / ".env").write_text("TOKEN=x\n")
    with pytest.raises(ProtectionError, match="would need protecting"):
        run_command_isolated("touch ran", working_dir=work, timeout=60)
    assert not (work / "ran").exists()
