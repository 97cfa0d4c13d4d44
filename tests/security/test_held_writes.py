"""Held writes, by class: what a sandboxed command plants for a host tool to run later.

With ``writes="auto"`` a one-shot sandbox writes into a copy-on-write layer over the
working dir; afterwards inert changes are applied and *active* ones (``activity.py``: a
host tool would run or load them without the user naming them) are held. With
``writes="review"`` everything is held. This suite goes by class, not by name: for each
class of ``activity.classify`` (bytecode, start-up hooks and executables on PATH,
importable modules, tool configuration and code, repository hooks and config) it

1. plants each member directly on the host (plain Python, no sandbox) and runs the host
   tool the way a user would: a canary file appears, so the member is a real vector;
2. plants the same members from inside the sandbox (runsc and Docker, one-shot, auto and
   review) and checks from the host that none of them is there, that the host tools
   create no canary, that each is in ``result.held`` with a reason naming its class, and
   that ``result.discard()`` leaves the host exactly as it was (auto: plus the inert
   files it applied, and nothing else).

Vectors found outside the classifier's first rules (``ESCAPES``: each escaped in auto once,
and says how) are tested the same way: ``Escaped`` is raised when a planted file reached
the host and fired there, ``NotHeld`` when it was applied but not fired (quarantined
afterwards by the after-command walk).

Every payload only creates a canary in a host directory outside the working dir (which
no sandbox can see). Host tools run with a minimal environment, a timeout and their own
process group; every held store is closed, and every host dir removed, at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.host_tools import TOOL_TIMEOUT
from support.host_tools import run_host_tool as host_tool

from gvisor_magic import CommandResult, IsolatedSession, SandboxSpec, activity, run_command_isolated
from gvisor_magic.changes import CLOCK_SLACK_NS
from gvisor_magic.writes import REVIEW

#: The host's Python: the kernel's (the one ``HostContext.current()`` describes).
PY = sys.executable
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
SITE = f".venv/lib/python{PYVER}/site-packages"
#: A sandboxed command gets this long.
SANDBOX_TIMEOUT = 120
BACKENDS = ("runsc", "docker")
MODES = ("auto", "review")
#: Relaxes the read-only protection of an existing repository's config and hooks, so
#: that a command can write them (into its layer) and the held writes are what stands.
RELAX_GIT = ("-.git/config", "-.git/hooks")


class NotHeld(AssertionError):
    """A planted active change was not held (applied, or missing from the change set)."""


class Escaped(NotHeld):
    """A planted active change reached the host and fired there: a classifier miss."""


# -- the project on the host ----------------------------------------------------------------


@dataclass
class Project:
    """A user's project (the working dir), their home, and where canaries go."""

    wd: Path
    home: Path
    scratch: Path

    def canary(self, name: str) -> Path:
        return self.scratch / name

    def env(self, **extra: str) -> dict[str, str]:
        """The minimal environment of the user's later shell on the host."""
        return {"HOME": str(self.home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                "GIT_CONFIG_NOSYSTEM": "1", "GIT_CEILING_DIRECTORIES": str(self.wd.parent),
                # Reading bytecode is what is tested; writing it would change the project.
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
                "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "TMPDIR": str(self.home), **extra}

    def git(self, *args: str) -> None:
        subprocess.run(["git", *args], cwd=self.wd, env=self.env(), stdin=subprocess.DEVNULL,
                       capture_output=True, check=True, timeout=TOOL_TIMEOUT)


def run_host_tool(project: Project, tool: Tool) -> str:
    """Run one host tool as the user would, bounded; returns how it ended (evidence)."""
    return host_tool(tool.argv, cwd=project.wd / tool.cwd, env=project.env(**tool.env),
                     label=f"{' '.join(tool.argv[:4])} (in {tool.cwd})", keep=200)


#: The notebook in notebooks/: Jupyter starts its kernel in that directory.
NOTEBOOK = ('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n')
USER_MODULE = "VALUE = 1\n"
SETTINGS = textwrap.dedent("""\
    DEBUG = False
    try:  # the Django pattern: a developer's own overrides, when present
        from local_settings import *  # noqa
    except ImportError:
        pass
""")


def make_project(root: Path, scratch: Path) -> Project:
    """A project as a user has it: a git repository with a commit, the user's modules (and
    the bytecode Python already cached for them), a package, a notebook folder with its
    helper, a test, the project's own virtual environment, and a bin/ on the PATH."""
    project = Project(root / "wd", root / "home", scratch)
    project.wd.mkdir(parents=True)
    project.home.mkdir()
    project.git("-c", "init.defaultBranch=main", "init", "-q", ".")
    files = {"README.md": "# a project\n", "usermod.py": USER_MODULE, "usermod2.py": USER_MODULE,
             "settings.py": SETTINGS, "pkg/__init__.py": "X = 1\n",
             "notebooks/helpers.py": USER_MODULE, "notebooks/analysis.ipynb": NOTEBOOK,
             "test_ok.py": "def test_ok():\n    pass\n",
             "test_tmp.py": "def test_tmp(tmp_path):\n    assert tmp_path.is_dir()\n",
             "bin/.keep": ""}
    for rel, text in files.items():
        (project.wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (project.wd / rel).write_text(text)
    project.git("add", "README.md")
    project.git("-c", "user.name=User", "-c", "user.email=user@example.invalid", "commit", "-q",
                "-m", "init")
    for rel in ("usermod.py", "pkg/__init__.py"):  # what an earlier import left
        source = str(project.wd / rel)
        py_compile.compile(source, cfile=importlib.util.cache_from_source(source), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    subprocess.run([PY, "-m", "venv", "--without-pip", str(project.wd / ".venv")], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT)
    return project


@pytest.fixture
def project(tmp_path, host_scratch, monkeypatch) -> Iterator[Project]:
    """A fresh project; its bin/ is on the host's PATH (the classifier's view refreshed)."""
    made = make_project(tmp_path, host_scratch)
    # What the after-command walk (postrun) moves away goes here, not to the user's cache.
    monkeypatch.setenv("GVISOR_MAGIC_QUARANTINE_DIR", str(tmp_path / "quarantine"))
    monkeypatch.setenv("PATH", f"{made.wd / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    activity._context_for.cache_clear()  # HostContext.current() is computed once per process
    try:
        yield made
    finally:
        activity._context_for.cache_clear()  # the next test sees the PATH monkeypatch restores


@pytest.fixture
def demo_project(tmp_path, host_scratch) -> Project:
    """Another project like it, for planting on the host: the sandbox's project is never
    written just before its command runs (a host edit then is a conflict, held as such)."""
    return make_project(tmp_path / "demo", host_scratch)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    request.getfixturevalue(f"{request.param}_works")
    return request.param


# -- members --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A host tool run the way a user would: argv, in a dir of the project, extra env."""

    argv: tuple[str, ...]
    cwd: str = "."
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Member:
    """One vector of a class: the active files it plants (each must be held, its reason
    naming ``klass``), inert helper files planted with it (applied in auto mode), empty
    directories it needs, and the host tool that fires it."""

    name: str
    klass: str
    files: dict[str, tuple[bytes, int]]
    tool: Tool
    helpers: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    dirs: tuple[str, ...] = ()

    def everything(self) -> dict[str, tuple[bytes, int]]:
        return {**self.helpers, **self.files}


def py_payload(project: Project, name: str) -> str:
    return f"open({str(project.canary(name))!r}, 'w').close()\n"


def sh_payload(project: Project, name: str) -> str:
    return f"touch '{project.canary(name)}'\n"


def text(value: str, mode: int = 0o644) -> tuple[bytes, int]:
    return value.encode(), mode


def script(value: str) -> tuple[bytes, int]:
    return value.encode(), 0o755


def appended(project: Project, rel: str, extra: str) -> tuple[bytes, int]:
    path = project.wd / rel
    return path.read_bytes() + extra.encode(), stat.S_IMODE(path.stat().st_mode)


def timestamp_pyc(project: Project, source_rel: str, payload: str) -> bytes:
    """Bytecode running ``payload`` with a header that matches the unchanged source."""
    from importlib import _bootstrap_external as external

    info = (project.wd / source_rel).stat()
    code = compile(payload, source_rel, "exec")
    return bytes(external._code_to_timestamp_pyc(code, int(info.st_mtime), info.st_size))


def unchecked_pyc(project: Project, source_rel: str, payload: str) -> bytes:
    """Hash-based bytecode Python loads without checking its source."""
    from importlib import _bootstrap_external as external

    digest = importlib.util.source_hash((project.wd / source_rel).read_bytes())
    return bytes(external._code_to_hash_pyc(compile(payload, source_rel, "exec"), digest,
                                            checked=False))


def cache_of(rel: str) -> str:
    """``dir/__pycache__/name.cpython-XY.pyc`` for a source, relative."""
    return os.path.relpath(importlib.util.cache_from_source(os.path.join("/x", rel)), "/x")


def bytecode_members(p: Project) -> list[Member]:
    return [
        Member("pycache-timestamp", "bytecode",
               {cache_of("usermod.py"): (timestamp_pyc(p, "usermod.py",
                                                       py_payload(p, "pycache-timestamp")),
                                         0o644)},
               Tool((PY, "-c", "import usermod"))),
        Member("pycache-unchecked", "bytecode",
               {cache_of("usermod2.py"): (unchecked_pyc(p, "usermod2.py",
                                                        py_payload(p, "pycache-unchecked")),
                                          0o644)},
               Tool((PY, "-c", "import usermod2"))),
        Member("sourceless-stdlib-shadow", "bytecode",
               {"colorsys.pyc": (timestamp_pyc(p, "usermod.py",
                                               py_payload(p, "sourceless-stdlib-shadow")),
                                 0o644)},
               Tool((PY, "-c", "import colorsys"))),
        Member("package-pycache", "bytecode",
               {cache_of("pkg/__init__.py"): (timestamp_pyc(p, "pkg/__init__.py",
                                                            py_payload(p, "package-pycache")),
                                              0o644)},
               Tool((PY, "-c", "import pkg"))),
    ]


def startup_members(p: Project) -> list[Member]:
    activate = ("bash", "-c", ". .venv/bin/activate && pip --version; true")
    return [
        Member("venv-pth", "startup-hook",
               {f"{SITE}/gvm_hook.pth": text("import os; " + py_payload(p, "venv-pth"))},
               Tool((".venv/bin/python", "-c", "pass"))),
        Member("venv-sitecustomize", "startup-hook",
               {f"{SITE}/sitecustomize.py": text(py_payload(p, "venv-sitecustomize"))},
               Tool((".venv/bin/python", "-c", "pass"))),
        Member("venv-activate", "startup-hook",
               {".venv/bin/activate": appended(p, ".venv/bin/activate",
                                               "\n" + sh_payload(p, "venv-activate"))},
               Tool(("bash", "-c", ". .venv/bin/activate"))),
        Member("venv-bin-program", "startup-hook",
               {".venv/bin/pip": script("#!/bin/sh\n" + sh_payload(p, "venv-bin-program"))},
               Tool(activate)),
        Member("path-dir-program", "executable-on-path",
               {"bin/git": script("#!/bin/sh\n" + sh_payload(p, "path-dir-program")
                                  + 'exec /usr/bin/git "$@"\n')},
               Tool(("git", "--version"), env={"PATH": f"{p.wd / 'bin'}:/usr/bin:/bin"})),
    ]


SIMPLEJSON = "from json import *  # noqa\nfrom json import JSONDecodeError  # noqa\n"


def importable_members(p: Project) -> list[Member]:
    return [
        Member("user-optional-import", "importable",
               {"local_settings.py": text(py_payload(p, "user-optional-import"))},
               Tool((PY, "-c", "import settings"))),
        Member("library-optional-import", "importable",
               {"simplejson.py": text(py_payload(p, "library-optional-import") + SIMPLEJSON)},
               Tool((PY, "-c", "import requests"))),
        Member("stdlib-shadow", "importable",
               {"json.py": text(py_payload(p, "stdlib-shadow"))},
               Tool((PY, "-c", "import json"))),
        Member("user-package-edit", "importable",
               {"pkg/__init__.py": appended(p, "pkg/__init__.py", py_payload(p,
                                                                           "user-package-edit"))},
               Tool((PY, "-c", "import pkg"))),
    ]


PYTEST = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_ok.py")


def pytest_plugin(p: Project, name: str) -> dict[str, tuple[bytes, int]]:
    """An inert helper: a module in a new namespace folder, loaded only when named."""
    return {f"plugs/gvm_{name.replace('-', '_')}.py": text(py_payload(p, name))}


def tool_members(p: Project) -> list[Member]:
    def plugin(name: str) -> str:
        return f"plugs.gvm_{name.replace('-', '_')}"

    return [
        Member("pytest-ini", "tool-config",
               {"pytest.ini": text(f"[pytest]\naddopts = -p {plugin('pytest-ini')}\n")},
               Tool(PYTEST), helpers=pytest_plugin(p, "pytest-ini")),
        Member("pyproject-pytest", "tool-config",
               {"pyproject.toml": text("[tool.pytest.ini_options]\naddopts = "
                                       f"\"-p {plugin('pyproject-pytest')}\"\n")},
               Tool(PYTEST), helpers=pytest_plugin(p, "pyproject-pytest")),
        Member("tox-ini", "tool-config",
               {"tox.ini": text(f"[pytest]\naddopts = -p {plugin('tox-ini')}\n")},
               Tool(PYTEST), helpers=pytest_plugin(p, "tox-ini")),
        Member("setup-cfg", "tool-config",
               {"setup.cfg": text(f"[tool:pytest]\naddopts = -p {plugin('setup-cfg')}\n")},
               Tool(PYTEST), helpers=pytest_plugin(p, "setup-cfg")),
        Member("conftest", "tool-code", {"conftest.py": text(py_payload(p, "conftest"))},
               Tool(PYTEST)),
        Member("pdbrc", "tool-code", {".pdbrc": text("!" + py_payload(p, "pdbrc"))},
               Tool((PY, "-m", "pdb", "-c", "continue", "usermod.py"))),
    ]


IDENTITY = ("-c", "user.name=Host", "-c", "user.email=host@example.invalid")


def repository_members(p: Project) -> list[Member]:
    hook = "#!/bin/sh\n"
    return [
        Member("fsmonitor", "repository",
               {".git/config": appended(p, ".git/config", "[core]\n\tfsmonitor = \""
                                        + sh_payload(p, "fsmonitor").strip() + "; true\"\n")},
               Tool(("git", "status"))),
        Member("hook-post-checkout", "repository",
               {".git/hooks/post-checkout": script(hook + sh_payload(p, "hook-post-checkout"))},
               Tool(("git", "checkout", "-q", "-b", "gvm-branch"))),
        Member("hook-pre-commit", "repository",
               {".git/hooks/pre-commit": script(hook + sh_payload(p, "hook-pre-commit"))},
               Tool(("git", *IDENTITY, "commit", "-q", "--allow-empty", "-m", "host"))),
    ]


CLASSES: dict[str, tuple[Callable[[Project], list[Member]], tuple[str, ...]]] = {
    "bytecode": (bytecode_members, ()),
    "startup-hook": (startup_members, ()),
    "importable": (importable_members, ()),
    "tool-config": (tool_members, ()),
    "repository": (repository_members, RELAX_GIT),
}


# -- planting ---------------------------------------------------------------------------------

_SAFE = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,._/:=+-#()[]{}!?*@")


def _printf_escape(data: bytes) -> str:
    """``data`` as a printf format a POSIX shell's printf reproduces byte for byte."""
    return "".join(chr(b) if b in _SAFE else ("\\n" if b == 10 else f"\\{b:03o}")
                   for b in data)


def _quote(path: str) -> str:
    assert "'" not in path, path
    return f"'{path}'"


def plant_script(files: dict[str, tuple[bytes, int]], dirs: tuple[str, ...] = ()) -> str:
    """A POSIX sh script writing ``files`` (relative path -> (bytes, mode)) in its cwd."""
    lines = ["set -e"]
    for rel in dirs:
        lines.append(f"mkdir -p {_quote(rel)}")
    for rel, (data, mode) in files.items():
        parent = os.path.dirname(rel)
        if parent:
            lines.append(f"mkdir -p {_quote(parent)}")
        lines.append(f"printf '{_printf_escape(data)}' > {_quote(rel)}")
        lines.append(f"chmod {mode:o} {_quote(rel)}")
    lines.append("echo gvm-planted")
    return "\n".join(lines) + "\n"


def plant_on_host(project: Project, member: Member) -> list[tuple[str, tuple[bytes, int] | None]]:
    """Write the member with plain Python on the host; returns what ``restore`` undoes
    (old contents, and the directories planting created, removed again)."""
    saved: list[tuple[str, tuple[bytes, int] | None]] = []
    wanted = [*member.dirs, *(os.path.dirname(rel) for rel in member.everything())]
    for rel in wanted:
        top = None
        parts = Path(rel).parts
        for depth in range(1, len(parts) + 1):
            candidate = os.path.join(*parts[:depth])
            if not (project.wd / candidate).exists():
                top = candidate
                break
        if top is not None:
            saved.append((top + "/", None))
            (project.wd / rel).mkdir(parents=True)
    for rel, (data, mode) in member.everything().items():
        path = project.wd / rel
        saved.append((rel, (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
                      if path.exists() else None))
        path.write_bytes(data)
        path.chmod(mode)
    return saved


def restore(project: Project, saved: list[tuple[str, tuple[bytes, int] | None]]) -> None:
    for rel, old in reversed(saved):
        path = project.wd / rel
        if rel.endswith("/"):
            shutil.rmtree(path)
        elif old is None:
            path.unlink()
        else:
            path.write_bytes(old[0])
            path.chmod(old[1])


def fire_on_host(project: Project, member: Member) -> str:
    return run_host_tool(project, member.tool)


#: How the planting command runs: a one-shot sandbox, a warm one of the pool, a session's.
HOW = ("one-shot", "reused", "session")


def run_planted(project: Project, backend: str, mode: str, files: dict[str, tuple[bytes, int]],
                dirs: tuple[str, ...] = (), protected: tuple[str, ...] = (), *,
                how: str = "one-shot") -> CommandResult:
    options: dict[str, object] = {"working_dir": str(project.wd), "writes": mode}
    if protected:
        options["protected_paths"] = list(protected)
    spec = SandboxSpec.from_options(options)
    script = plant_script(files, dirs)
    if how == "session":
        with IsolatedSession(spec, mode=backend) as session:
            session.run("true", timeout=SANDBOX_TIMEOUT)  # a session that ran before
            result = session.run(script, timeout=SANDBOX_TIMEOUT)
        assert result.details.get("session"), result.details
    elif how == "reused":
        for _ in range(2):  # the pool keeps a sandbox for a spec used twice
            run_command_isolated("true", spec, mode=backend, timeout=SANDBOX_TIMEOUT)
        result = run_command_isolated(script, spec, mode=backend, timeout=SANDBOX_TIMEOUT)
        assert "reused" in result.details, result.details
    else:
        result = run_command_isolated(script, spec, mode=backend, reuse=False,
                                      timeout=SANDBOX_TIMEOUT)
    assert result.backend == backend and result.isolated, result.describe()
    return result


@contextlib.contextmanager
def closing_writes(result: CommandResult) -> Iterator[CommandResult]:
    """Whatever happens, the held store goes (the leak check counts it otherwise)."""
    try:
        yield result
    finally:
        if result.writes is not None:
            result.writes.close()


# -- snapshots --------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: relative path -> (type, mode, size, sha256 / link target)."""
    entries: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[rel] = ("dir", oct(info.st_mode))
            else:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                entries[rel] = ("file", oct(info.st_mode), info.st_size, digest)
    return entries


def changed_paths(before: dict[str, tuple], after: dict[str, tuple]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


# -- the checks -------------------------------------------------------------------------------


def check_planted(result: CommandResult) -> None:
    assert result.returncode == 0 and "gvm-planted" in result.stdout, (
        f"the sandbox could not plant: {result.describe()}\n{result.stderr}")


def check_plant_is_exact(result: CommandResult, files: dict[str, tuple[bytes, int]]) -> None:
    """The layer holds what the sandbox's printf was asked to write: size and mode."""
    changes = {c.path: c for c in result.changes}
    for rel, (data, mode) in files.items():
        assert rel in changes, f"{rel} is not in the change set: {sorted(changes)}"
        c = changes[rel]
        assert (c.size, stat.S_IMODE(c.mode)) == (len(data), mode), (rel, c.size, oct(c.mode))


def check_held(project: Project, result: CommandResult, members: list[Member], mode: str,
               before: dict[str, tuple], *, review_reason_will_do: bool = False) -> None:
    """Every active file of every member is held (reason naming its class) and absent from
    the host; otherwise fire the host tool and raise ``Escaped`` with what happened.
    ``review_reason_will_do``: held only because of review mode is enough (a vector the
    classifier misses, in review mode)."""
    held = {c.path: c for c in result.held}
    changes = {c.path: c for c in result.changes}
    assert result.details.get("writes", "").startswith(f"{mode}: "), result.details
    escaped = []
    now = changed_paths(before, snapshot(project.wd))
    for member in members:
        for rel in member.files:
            on_host = rel in now
            c = changes.get(rel)
            if on_host or rel not in held:
                status = "missing from the change set" if c is None else (
                    f"{c.status} ({c.held_reason})")
                escaped.append(f"{member.name}: {rel} {status}, on the host: {bool(on_host)}")
                continue
            reason = held[rel].held_reason or ""
            if review_reason_will_do and reason == REVIEW:
                continue
            assert reason.startswith(f"{member.klass}: "), (
                f"{member.name}: {rel} is held for {reason!r}, not as {member.klass}")
    if escaped:
        fired = []
        for member in members:
            log = fire_on_host(project, member)
            if project.canary(member.name).exists():
                fired.append(f"{member.name} fired on the host ({log})")
        message = "held writes let active changes through: " + "; ".join(escaped)
        if fired:
            raise Escaped(message + " | " + "; ".join(fired))
        raise NotHeld(message + " | none fired on the host (quarantined afterwards: "
                      f"{result.details.get('quarantined', 'no')})")


def check_discarded(project: Project, result: CommandResult, members: list[Member], mode: str,
                    before: dict[str, tuple]) -> None:
    """``discard()`` settles every held change; the host holds exactly what was applied."""
    if mode == "review":
        assert not [c for c in result.changes if c.status == "applied"], result.changes
    result.discard()
    assert result.held == [], result.held
    active = {rel for m in members for rel in m.files}
    for c in result.changes:
        if c.path in active:
            assert c.status == "discarded", (c.path, c.status)
    applied = {c.path for c in result.changes if c.status == "applied"}
    assert changed_paths(before, snapshot(project.wd)) == applied, (
        "the host changed by more (or less) than the applied inert changes: "
        f"{sorted(changed_paths(before, snapshot(project.wd)) ^ applied)}")
    if mode == "auto":
        helpers = {rel for m in members for rel in m.helpers}
        assert helpers <= applied, f"inert helpers not applied in auto mode: {helpers - applied}"


def check_nothing_fires(project: Project, members: list[Member]) -> None:
    logs = [fire_on_host(project, m) for m in members]
    fired = sorted(p.name for p in project.scratch.iterdir())
    assert not fired, f"canaries on the host after discard: {fired}\n" + "\n".join(logs)


def demonstrate_on_host(project: Project, members: list[Member]) -> None:
    """Each member, planted on the host without a sandbox, fires under its host tool."""
    assert not list(project.scratch.iterdir()), "the canary dir must start empty"
    for member in members:
        saved = plant_on_host(project, member)
        assert not project.canary(member.name).exists(), f"{member.name}: planting fired it"
        log = fire_on_host(project, member)
        assert project.canary(member.name).exists(), (
            f"{member.name} did not fire when planted on the host: {log}")
        if project.canary(member.name).is_dir():  # pytest's --basetemp
            shutil.rmtree(project.canary(member.name))
        else:
            project.canary(member.name).unlink()
        restore(project, saved)


def past_the_clock_slack(root: Path) -> None:
    """Wait until every entry under root was changed more than ``CLOCK_SLACK_NS`` ago.

    A host change that close to a command's start counts as made while it ran (held as a
    conflict, whatever its class): the project was just built, so this is a barrier on the
    clock itself, computed from the entries' ctimes, not a guess at another process."""
    newest = max(os.lstat(os.path.join(d, n)).st_ctime_ns
                 for d, dirs, files in os.walk(root) for n in dirs + files)
    deadline = newest + CLOCK_SLACK_NS + 1_000_000
    while time.time_ns() <= deadline:
        time.sleep(0.002)


def held_round_trip(project: Project, backend: str, mode: str, members: list[Member],
                    protected: tuple[str, ...] = (), *,
                    review_reason_will_do: bool = False, how: str = "one-shot") -> None:
    """Plant every member in one sandbox run; held, absent, discarded, and inert after."""
    past_the_clock_slack(project.wd)
    before = snapshot(project.wd)
    files: dict[str, tuple[bytes, int]] = {}
    dirs: tuple[str, ...] = ()
    for member in members:
        files.update(member.everything())
        dirs += member.dirs
    result = run_planted(project, backend, mode, files, dirs, protected, how=how)
    with closing_writes(result):
        check_planted(result)
        check_plant_is_exact(result, files)
        assert "quarantined" not in result.details or review_reason_will_do, (
            f"the layer held nothing back, postrun had to: {result.details['quarantined']}")
        check_held(project, result, members, mode, before,
                   review_reason_will_do=review_reason_will_do)
        check_discarded(project, result, members, mode, before)
        check_nothing_fires(project, members)


# -- the classes ------------------------------------------------------------------------------


@pytest.mark.parametrize("klass", list(CLASSES))
def test_each_member_fires_when_planted_on_the_host(project, klass):
    """Harness check: without a sandbox every member of the class is a real vector (so a
    canary that does not appear below means the member was held, not that it is inert)."""
    members, _protected = CLASSES[klass]
    demonstrate_on_host(project, members(project))


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("klass", list(CLASSES))
def test_a_class_planted_in_the_sandbox_is_held(project, backend, mode, klass, how):
    """All members of one class planted by one sandboxed command (one-shot, in a warm
    sandbox of the pool, in a session): none is on the host, each is held naming the
    class, discard leaves the host as it was, no host tool fires."""
    members, protected = CLASSES[klass]
    held_round_trip(project, backend, mode, members(project), protected, how=how)


# -- active files in a directory the command created ------------------------------------------

NEW_REPO = {"sub/.git/HEAD": text("ref: refs/heads/main\n"),
            "sub/.git/config": text("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n"
                                    "\tbare = false\n")}
NEW_REPO_DIRS = ("sub/.git/objects", "sub/.git/refs/heads", "sub/.git/refs/tags")


def new_dir_members(p: Project) -> dict[str, Member]:
    members = [
        Member("new-package-dir", "importable",
               {"csv/__init__.py": text(py_payload(p, "new-package-dir"))},
               Tool((PY, "-c", "import csv"))),
        Member("new-pycache-dir", "bytecode",
               {cache_of("notebooks/helpers.py"): (
                   timestamp_pyc(p, "notebooks/helpers.py", py_payload(p, "new-pycache-dir")),
                   0o644)},
               Tool((PY, "-c", "import helpers"), cwd="notebooks")),
        Member("new-venv", "startup-hook",
               {"env2/pyvenv.cfg": text(f"home = {os.path.dirname(PY)}\n"),
                "env2/bin/activate": text(sh_payload(p, "new-venv"))},
               Tool(("bash", "-c", ". env2/bin/activate"))),
        Member("new-repo-hook", "repository",
               {"sub/.git/hooks/pre-commit": script("#!/bin/sh\n"
                                                    + sh_payload(p, "new-repo-hook"))},
               Tool(("git", "-C", "sub", *IDENTITY, "commit", "-q", "--allow-empty", "-m",
                     "x")), helpers=NEW_REPO, dirs=NEW_REPO_DIRS),
        Member("new-tests-conftest", "tool-code",
               {"tests/conftest.py": text(py_payload(p, "new-tests-conftest"))},
               Tool((PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"))),
    ]
    return {m.name: m for m in members}


NEW_DIR_MEMBERS = ("new-package-dir", "new-pycache-dir", "new-venv", "new-repo-hook",
                   "new-tests-conftest")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NEW_DIR_MEMBERS)
def test_an_active_file_in_a_new_directory_is_held(project, demo_project, backend, mode,
                                                   name):
    """A package, a __pycache__, a virtual environment, a repository, a tests/ folder that
    the command created: the active file inside is held like the same file elsewhere (a
    new directory may land for an inert sibling's sake, never with the held file: applying a
    directory applies what is below it, and an earlier working tree applied a new
    ``__pycache__`` in auto mode together with the bytecode it held)."""
    demonstrate_on_host(demo_project, [new_dir_members(demo_project)[name]])
    member = new_dir_members(project)[name]
    held_round_trip(project, backend, mode, [member])


# -- vectors outside the classifier's explicit rules -------------------------------------------


def hooks_path_member(p: Project) -> Member:
    """The project keeps its hooks in .githooks/ (core.hooksPath, set on the host), and
    the sandbox edits the benign pre-commit hook it already has there."""
    (p.wd / ".githooks").mkdir()
    (p.wd / ".githooks" / "pre-commit").write_text("#!/bin/sh\nexit 0\n")
    (p.wd / ".githooks" / "pre-commit").chmod(0o755)
    p.git("config", "core.hooksPath", ".githooks")
    return Member("hookspath-hook", "repository",
                  {".githooks/pre-commit": script("#!/bin/sh\n" + sh_payload(p, "hookspath-hook")
                                                  + "exit 0\n")},
                  Tool(("git", *IDENTITY, "commit", "-q", "--allow-empty", "-m", "host")))


def project_venv_package_member(p: Project) -> Member:
    """A package installed in the project's own venv (copied from the kernel's)."""
    import idna

    target = p.wd / SITE / "idna"
    shutil.copytree(os.path.dirname(idna.__file__), target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return Member("venv-package-module", "importable",
                  {f"{SITE}/idna/core.py": appended(p, f"{SITE}/idna/core.py",
                                                    "\n" + py_payload(p, "venv-package-module"))},
                  Tool((".venv/bin/python", "-c", "import idna")))


def notebook_optional_import_member(p: Project) -> Member:
    return Member("notebook-optional-import", "importable",
                  {"notebooks/simplejson.py": text(py_payload(p, "notebook-optional-import")
                                                   + SIMPLEJSON)},
                  Tool((PY, "-c", "import requests"), cwd="notebooks"))


def pytest_filterwarnings_member(p: Project) -> Member:
    return Member("pytest-filterwarnings", "tool-config",
                  {"pytest.ini": text("[pytest]\nfilterwarnings =\n"
                                      "    error::plugs.gvm_fw.GvmWarning\n")},
                  Tool(PYTEST),
                  helpers={"plugs/gvm_fw.py": text(py_payload(p, "pytest-filterwarnings")
                                                   + "class GvmWarning(Warning):\n    pass\n")})


def pytest_basetemp_member(p: Project) -> Member:
    """pytest removes its --basetemp (rm -rf) and re-creates it: a directory the config
    names, outside the working dir. The canary is that directory, created by pytest."""
    return Member("pytest-basetemp", "tool-config",
                  {"pytest.ini": text("[pytest]\naddopts = "
                                      f"--basetemp={p.canary('pytest-basetemp')}\n")},
                  Tool((PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tmp.py")))


EXTENSION_SOURCE = r"""
#include <Python.h>
#include <stdio.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "helpers", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_helpers(void) {
    FILE *f = fopen(CANARY, "w");
    if (f) fclose(f);
    return PyModule_Create(&def);
}
"""


def extension_shadow_member(p: Project) -> Member:
    """A compiled ``helpers`` beside the notebook's unchanged helpers.py: Python's finder
    tries extension modules before sources, so it runs instead of the source."""
    include = sysconfig.get_paths()["include"]
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not os.path.exists(os.path.join(include, "Python.h")):
        pytest.skip(f"no C compiler or no Python.h in {include}: cannot build the extension "
                    "module this vector plants")
    build = p.scratch.parent / f"{p.scratch.name}-build"
    build.mkdir()
    try:
        (build / "helpers.c").write_text(EXTENSION_SOURCE)
        subprocess.run([compiler, "-shared", "-fPIC", "-O0", "-s", f"-I{include}",
                        f"-DCANARY=\"{p.canary('extension-shadow')}\"", "-o",
                        str(build / "helpers.so"), str(build / "helpers.c")],
                       check=True, capture_output=True, timeout=TOOL_TIMEOUT)
        data = (build / "helpers.so").read_bytes()
    finally:
        shutil.rmtree(build, ignore_errors=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return Member("extension-shadow", "importable",
                  {f"notebooks/helpers{suffix}": (data, 0o755)},
                  Tool((PY, "-c", "import helpers"), cwd="notebooks"))


def stale_path_member(p: Project) -> Member:
    return Member("stale-path-program", "executable-on-path",
                  {"tools/git": script("#!/bin/sh\n" + sh_payload(p, "stale-path-program")
                                       + 'exec /usr/bin/git "$@"\n')},
                  Tool(("git", "--version"), env={"PATH": f"{p.wd / 'tools'}:/usr/bin:/bin"}))


ESCAPES: dict[str, tuple[Callable[[Project], Member], str]] = {
    "hookspath-hook": (hooks_path_member, (
        "repository: a hook in the directory named by the host's core.hooksPath "
        "(.githooks/pre-commit) is judged by its path alone: only hooks/ of a git dir and "
        ".husky/ are hooks to activity._repository, so git commit runs it on the host")),
    "venv-package-module": (project_venv_package_member, (
        "importable: a module of a package installed in the project's own venv under the "
        "working dir (.venv/lib/pythonX.Y/site-packages/idna/core.py) is inert: only .pth, "
        "sitecustomize, pyvenv.cfg and bin/ of a venv are judged; site-packages count as "
        "import dirs only when they are on the kernel process's own sys.path")),
    "notebook-optional-import": (notebook_optional_import_member, (
        "importable: a module below the working dir is held only when it shadows a name the "
        "host *can* import (HostContext.importable); an optional import of a name that is "
        "not installed (requests tries simplejson) is missed: notebooks/simplejson.py runs "
        "in a kernel started in notebooks/")),
    "pytest-filterwarnings": (pytest_filterwarnings_member, (
        "tool-config: pytest's filterwarnings (and -W) import the module named in a warning "
        "category (_pytest.config._resolve_warning_category); activity._pytool_runs checks "
        "only plugins/init-hook, addopts and pythonpath, so pytest.ini with "
        "filterwarnings = error::plugs.gvm_fw.GvmWarning (and plugs/gvm_fw.py) is inert")),
    "pytest-basetemp": (pytest_basetemp_member, (
        "tool-config: pytest.ini with addopts = --basetemp=DIR is inert (--basetemp is not in "
        "activity._PYTEST_EXEC_OPTS), yet pytest rm -rf's DIR before re-creating it when a "
        "test uses tmp_path: a deferred deletion (or write) anywhere the user can write")),
    "extension-shadow": (extension_shadow_member, (
        "bytecode: a compiled extension module (helpers.cpython-XY-*.so) beside an unchanged "
        "helpers.py in a subdirectory runs instead of the source (extensions come first in "
        "the finder) but activity.classify judges it as an ordinary module below the working "
        "dir (inert unless its name is importable by the kernel): auto applies it (status "
        "'applied'), and only the after-command walk (postrun) then quarantines it, so the "
        "change set says applied for a file the host does not have. Not held; not fired")),
    "stale-path-program": (stale_path_member, (
        "executable-on-path: HostContext.current() is lru_cached for the process; a PATH "
        "entry added after the first classification (%env PATH=..., os.environ) is never "
        "seen, so a program written into it is inert")),
}


def escape_params() -> list:
    return [pytest.param(name, mode, id=f"{name}-{mode}")
            for name in ESCAPES for mode in MODES]


@pytest.mark.parametrize(("name", "mode"), escape_params())
def test_a_vector_outside_the_explicit_rules_is_held(project, demo_project, backend, name,
                                                     mode, monkeypatch):
    """Vectors found outside the classifier's first rules (each had escaped in auto; ESCAPES
    says how): each fires when planted on the host; in the sandbox it is held like its
    class (review holds everything, so there it is held, for review's reason at least)."""
    build, _reason = ESCAPES[name]
    demonstrate_on_host(demo_project, [build(demo_project)])
    member = build(project)
    if name == "stale-path-program":
        activity.HostContext.current()  # the kernel classified something earlier
        (project.wd / "tools").mkdir()
        monkeypatch.setenv("PATH", f"{project.wd / 'tools'}{os.pathsep}{os.environ['PATH']}")
    held_round_trip(project, backend, mode, [member], review_reason_will_do=True)


# -- review mode: inert files too -------------------------------------------------------------


def test_review_holds_inert_files_and_applies_exactly_what_is_chosen(project, backend):
    """writes='review': a CSV is held too (nothing lands); apply(['data.csv']) lands that
    file, byte for byte, and nothing else; the rest stays held until discarded."""
    past_the_clock_slack(project.wd)
    before = snapshot(project.wd)
    files = {"data.csv": text("a,b\n1,2\n"), "results/out.csv": text("x\n3\n"),
             "json.py": text(py_payload(project, "review-json"))}
    result = run_planted(project, backend, "review", files)
    with closing_writes(result):
        check_planted(result)
        assert result.details["writes"] == "review: 0 applied, 4 held for review", result.details
        assert {c.path for c in result.held} == {"data.csv", "results", "results/out.csv",
                                                 "json.py"}
        assert result.changes and all(c.status == "held" for c in result.changes)
        csv = next(c for c in result.held if c.path == "data.csv")
        assert csv.held_reason == "writes='review': nothing is applied without review", csv
        assert next(c for c in result.held if c.path == "json.py").held_reason.startswith(
            "importable: ")
        assert changed_paths(before, snapshot(project.wd)) == set(), "review wrote to the host"

        report = result.apply(["data.csv"])
        assert report.ok, report
        assert (project.wd / "data.csv").read_bytes() == b"a,b\n1,2\n"
        assert changed_paths(before, snapshot(project.wd)) == {"data.csv"}
        assert {c.path for c in result.held} == {"results", "results/out.csv", "json.py"}
        assert next(c for c in result.changes if c.path == "data.csv").status == "applied"

        result.discard()
        assert result.held == []
        assert changed_paths(before, snapshot(project.wd)) == {"data.csv"}
        assert not (project.wd / "json.py").exists() and not (project.wd / "results").exists()
        log = run_host_tool(project, Tool((PY, "-c", "import json")))
        assert not list(project.scratch.iterdir()), log


def test_auto_applies_an_inert_csv_at_once(project, backend):
    """writes='auto': a CSV lands as the command wrote it, nothing is held, no store stays."""
    past_the_clock_slack(project.wd)
    before = snapshot(project.wd)
    result = run_planted(project, backend, "auto", {"data.csv": text("a,b\n1,2\n")})
    with closing_writes(result):
        check_planted(result)
        assert result.held == [] and result.details["writes"] == (
            "auto: 1 applied, 0 held for review"), result.details
        assert (project.wd / "data.csv").read_bytes() == b"a,b\n1,2\n"
        assert changed_paths(before, snapshot(project.wd)) == {"data.csv"}


def test_discard_after_everything_was_applied_is_a_no_op(project, runsc_works):
    result = run_planted(project, "runsc", "auto", {"data.csv": text("a,b\n")})
    with closing_writes(result):
        check_planted(result)
        assert result.held == []
        result.discard()
