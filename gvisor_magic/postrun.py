"""After every isolated command: find what a host tool would run later, and neutralise it.

Mounts make the protected paths read-only (``gvisor_magic.protected``), but
some things cannot be mounted: a repository the command creates, a
``sitecustomize.py``, a ``.pth`` where the host's Python will find it, a module
in the kernel's cwd that shadows an importable name (IPython puts ``''`` first
on ``sys.path``), a protected file that did not exist (an empty stand-in would
change how bash starts), or a protected symlink the command replaced. One walk
of the working dir after the command finds them by what changed since it
started, moves each into the quarantine directory (never deletes it), and
reports it in ``result.details["quarantined"]``. The same walk removes set-ID
bits (``gvisor_magic.setid``).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import logging
import os
import re
import shutil
import stat
import sys
import time

from .protected import ProtectionPlan, quarantine_root
from .setid import MAX_ENTRIES, SETID_BITS, clear_setid
from .stand_ins import sweep

log = logging.getLogger("gvisor_magic")

#: Timestamps on some filesystems are coarse: look a little before the start.
SLACK = 2.0
#: git configuration that makes git run a program (section, key); ``*`` any subsection.
GIT_EXEC_KEYS = (
    ("core", "fsmonitor"), ("core", "hookspath"), ("core", "sshcommand"), ("core", "pager"),
    ("core", "editor"), ("core", "askpass"), ("core", "gitproxy"),
    ("core", "alternaterefscommand"), ("sequence", "editor"), ("diff", "external"),
    ("diff", "textconv"), ("diff", "command"), ("merge", "driver"), ("filter", "clean"),
    ("filter", "smudge"), ("filter", "process"), ("alias", "*"), ("credential", "*"),
    ("gpg", "program"), ("uploadpack", "packobjectshook"), ("remote", "uploadpack"),
    ("remote", "receivepack"), ("remote", "vcs"), ("submodule", "update"), ("include", "*"),
    ("includeif", "*"), ("pager", "*"), ("web", "browser"), ("browser", "cmd"),
    ("man", "cmd"), ("difftool", "cmd"), ("mergetool", "cmd"), ("sendemail", "*"),
    ("ssh", "variant"), ("protocol", "allow"),
)
_SECTION = re.compile(r'^\s*\[\s*([A-Za-z0-9.-]+)(?:\s+"[^"]*")?\s*\]')
_KEY = re.compile(r"^\s*([A-Za-z][A-Za-z0-9-]*)\s*(=|$)")


def git_config_runs_programs(text: str) -> list[str]:
    """The ``section.key`` entries of a git config that would make git run something."""
    found, section = [], ""
    for line in text.splitlines():
        header = _SECTION.match(line)
        if header:
            section = header.group(1).split(".")[0].lower()
            line = line[header.end():]
        key = _KEY.match(line)
        if not key:
            continue
        name = key.group(1).lower()
        for want_section, want_key in GIT_EXEC_KEYS:
            if section == want_section and want_key in ("*", name):
                found.append(f"{section}.{name}")
    return found


def _host_import_dirs() -> set[str]:
    """Directories the host's Python imports from at start (where a ``.pth`` runs)."""
    dirs = {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    with contextlib.suppress(Exception):
        import site

        dirs.update(os.path.realpath(p) for p in site.getsitepackages())
        dirs.add(os.path.realpath(site.getusersitepackages()))
    return dirs


#: Standard modules nothing imports on its own: a user's ``test.py`` is just a script.
_NEVER_IMPORTED = frozenset({"test", "this", "antigravity", "idlelib", "turtledemo",
                             "__phello__", "__hello__"})


def _shadows_importable(name: str, cwd: str) -> bool:
    """Whether ``import name`` in a kernel started in ``cwd`` would otherwise find something."""
    if not name.isidentifier() or name in _NEVER_IMPORTED:
        return False
    if name in sys.builtin_module_names or name in getattr(sys, "stdlib_module_names", ()):
        return True
    path = [p for p in sys.path if p and os.path.realpath(p) != cwd]
    with contextlib.suppress(Exception):
        return importlib.machinery.PathFinder.find_spec(name, path) is not None
    return False


class _Walk:
    def __init__(self, root: str, since: float, plan: ProtectionPlan | None, cwd: str | None):
        self.root = root
        self.since = since - SLACK
        self.plan = plan or ProtectionPlan()
        self.cwd = cwd
        self.stripped: list[str] = []
        self.found: list[tuple[str, str]] = []
        self.import_dirs = _host_import_dirs()
        self.quarantine = quarantine_root()

    def new(self, info: os.stat_result) -> bool:
        return info.st_ctime >= self.since

    def run(self) -> None:
        pending, seen = [self.root], 0
        while pending:
            directory = pending.pop()
            if directory == self.quarantine:
                continue
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            kind = _git_role(directory)
            for entry in entries:
                seen += 1
                if seen > MAX_ENTRIES:
                    log.warning("gvisor: stopped checking %s after %d entries", self.root,
                                MAX_ENTRIES)
                    return
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
                    if info.st_mode & stat.S_ISGID and self.new(info):
                        # Docker's runtime takes chmod g+s (runsc's seccomp filter refuses
                        # it): new files below would join the directory's group on the host.
                        with contextlib.suppress(OSError):
                            os.chmod(entry.path, stat.S_IMODE(info.st_mode) & ~stat.S_ISGID)
                            self.stripped.append(entry.path)
                    if directory == self.cwd and self.new(info) and _shadows_importable(
                            entry.name, self.cwd) and os.path.exists(
                            os.path.join(entry.path, "__init__.py")):
                        self.found.append((entry.path, f"a package shadowing 'import "
                                           f"{entry.name}' in the kernel's directory"))
                    continue
                if not self.new(info):
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_mode & SETID_BITS \
                        and clear_setid(entry.path, info):
                    self.stripped.append(entry.path)
                why = self.auto_run(directory, kind, entry.name, entry.path, info)
                if why:
                    self.found.append((entry.path, why))

    def auto_run(self, directory: str, role: str, name: str, path: str,
                 info: os.stat_result) -> str:
        """Why a new or changed file would run on the host later ("" if it would not)."""
        if name in ("sitecustomize.py", "usercustomize.py"):
            return "Python runs it at every start"
        if name.endswith(".pth") and (os.path.realpath(directory) in self.import_dirs
                                      or re.search(r"/\.local/lib/python[^/]*/site-packages$",
                                                   directory)):
            return "Python runs .pth files in its import path at every start"
        if role == "gitdir" and name in ("config", "config.worktree") \
                and stat.S_ISREG(info.st_mode):
            keys = _git_exec_keys(path)
            if keys:
                return f"git configuration that runs programs ({', '.join(keys[:5])})"
        if role == "hooks" and not name.endswith(".sample"):
            return "a git hook: git runs it"
        if directory == self.cwd and self.cwd is not None:
            stem = name.split(".")[0]
            if (name.endswith(".py") or re.fullmatch(r"[^.]+(\.[^.]+)?\.(so|pyd)", name)) \
                    and _shadows_importable(stem, self.cwd):
                return (f"shadows 'import {stem}' in the kernel's directory (IPython puts its "
                        "directory first on sys.path)")
        return ""


def _git_role(directory: str) -> str:
    """``gitdir`` for a git dir, ``hooks`` for its hooks dir, else ""."""
    if _looks_like_gitdir(directory):
        return "gitdir"
    if os.path.basename(directory) == "hooks" and _looks_like_gitdir(os.path.dirname(directory)):
        return "hooks"
    return ""


def _looks_like_gitdir(directory: str) -> bool:
    if os.path.basename(directory) == ".git":
        return True
    return os.path.isfile(os.path.join(directory, "HEAD")) and os.path.isdir(
        os.path.join(directory, "objects"))


def _git_exec_keys(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return git_config_runs_programs(handle.read(1 << 20))
    except OSError:
        return []


def quarantine(path: str, root: str | None = None) -> str:
    """Move ``path`` (file, link or tree) into the quarantine dir; return where it went.

    Nothing in there runs: files lose their execute bits and the tree is private.
    """
    root = root or quarantine_root()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = os.path.join(root, stamp, path.lstrip("/"))
    counter = 1
    while os.path.lexists(target):
        target = os.path.join(root, f"{stamp}-{counter}", path.lstrip("/"))
        counter += 1
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(root, 0o700)
    shutil.move(path, target)
    for current, dirs, files in os.walk(target) if os.path.isdir(target) else [("", [], [])]:
        for name in files:
            with contextlib.suppress(OSError):
                full = os.path.join(current, name)
                if not os.path.islink(full):
                    os.chmod(full, 0o600)
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(current, name), 0o700)
    if os.path.isfile(target) and not os.path.islink(target):
        os.chmod(target, 0o600)
    return target


def check_after_run(working_dir: str | None, since: float, plan: ProtectionPlan | None = None,
                    *, cwd: str | None = None) -> dict[str, str]:
    """Strip set-ID bits and quarantine what would run later; return result details.

    ``since`` is a ``time.time()`` taken before the command started; ``cwd`` is
    the calling kernel's directory (default: this process's), where a new module
    shadowing an importable name would be imported by the kernel.
    """
    if not working_dir:
        return {}
    cwd = os.path.realpath(cwd or os.getcwd())
    walk = _Walk(os.path.realpath(working_dir), since, plan, cwd)
    walk.run()
    found = list(walk.found)
    for path, why in walk.plan.watched:
        if os.path.lexists(path) and not any(path == f for f, _ in found):
            found.append((path, f"a protected path that did not exist before ({why})"))
    restore = []
    for path, target in walk.plan.links:
        try:
            unchanged = os.readlink(path) == target
        except OSError:
            unchanged = False
        if not unchanged:
            if os.path.lexists(path):
                found.append((path, "replaced a protected symlink"))
            restore.append((path, target))
    details: dict[str, str] = {}
    if walk.stripped:
        details["stripped_setid"] = ", ".join(walk.stripped)
        log.warning("gvisor: removed set-ID bits a sandboxed command set on %s",
                    ", ".join(walk.stripped[:20]))
    moved = []
    # Deepest first, so a tree that holds other finds moves once, as a whole.
    for path, why in sorted(dict(found).items(), key=lambda item: -item[0].count("/")):
        if not os.path.lexists(path):
            continue
        try:
            moved.append(f"{path} -> {quarantine(path)} ({why})")
        except OSError as exc:
            moved.append(f"{path} ({why}; could not be moved: {exc})")
    for path, target in restore:
        with contextlib.suppress(OSError):
            os.symlink(target, path)
    if moved:
        sweep()  # a stand-in that only held what was just moved away goes too
        details["quarantined"] = "; ".join(moved)
        log.warning("gvisor: quarantined what a sandboxed command left to run later: %s",
                    "; ".join(moved[:10]))
    return details
