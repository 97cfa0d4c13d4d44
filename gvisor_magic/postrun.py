"""After every isolated command: find what a host tool would run later, and neutralise it.

Mounts make the protected paths read-only (``gvisor_magic.protected``), but
some things cannot be mounted: a repository the command creates, a
``sitecustomize.py``, a ``.pth`` where the host's Python will find it, a module
in the kernel's cwd that shadows an importable name (IPython puts ``''`` first
on ``sys.path``), bytecode Python would run instead of a source (a sourceless
``NAME.pyc``, a ``__pycache__`` entry that is not what its source compiles to),
a protected file that did not exist (an empty stand-in would
change how bash starts), or a protected symlink the command replaced. One walk
of the working dir after the command finds them by what changed since it
started, moves each into the quarantine directory (never deletes it), and
reports it in ``result.details["quarantined"]``. The same walk removes set-ID
bits (``gvisor_magic.setid``).

``epilogue`` is what every isolated command's result goes through, one-shot, in a warm
sandbox of the pool or in an ``IsolatedSession``, interrupted or not.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.machinery
import importlib.util
import logging
import marshal
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .protected import (
    READ_ONLY,
    SCRUBBED,
    ProtectionPlan,
    protection_details,
    quarantine_root,
)
from .setid import MAX_ENTRIES, SETID_BITS, clear_setid
from .stand_ins import sweep

if TYPE_CHECKING:
    from .result import CommandResult

log = logging.getLogger("gvisor_magic")

#: Timestamps on some filesystems are coarse: look a little before the start.
SLACK = 2.0
#: git configuration that makes git run a program, by class: (section, key pattern), the key
#: matched with ``fnmatch`` whatever the subsection (``[gpg "ssh"] program`` is ``gpg``,
#: ``program``). From git-config(1): every key whose value is a command, a program, a hook
#: dir, a tool's command line, or another config file to include.
GIT_EXEC_KEYS = (
    # core: fsmonitor hook, hooks dir, ssh, proxy, pager, editor, askpass, alternates.
    ("core", "fsmonitor"), ("core", "hookspath"), ("core", "sshcommand"), ("core", "pager"),
    ("core", "editor"), ("core", "askpass"), ("core", "gitproxy"),
    ("core", "alternaterefscommand"), ("sequence", "editor"), ("interactive", "difffilter"),
    # diff, merge and filter drivers, and the external tools.
    ("diff", "external"), ("diff", "textconv"), ("diff", "command"), ("merge", "driver"),
    ("filter", "clean"), ("filter", "smudge"), ("filter", "process"),
    ("difftool", "cmd"), ("difftool", "path"), ("mergetool", "cmd"), ("mergetool", "path"),
    ("guitool", "cmd"), ("tar", "command"),
    # signing: gpg.program, gpg.<format>.program, gpg.ssh.defaultKeyCommand.
    ("gpg", "program"), ("gpg", "defaultkeycommand"),
    # trailers (git interpret-trailers, git commit --trailer).
    ("trailer", "command"), ("trailer", "cmd"),
    # transports: what runs on the other end, remote helpers, URL rewriting (ext:: runs a
    # program), protocol policy, ssh flavour.
    ("uploadpack", "packobjectshook"), ("remote", "uploadpack"), ("remote", "receivepack"),
    ("remote", "vcs"), ("url", "insteadof"), ("url", "pushinsteadof"), ("protocol", "allow"),
    ("ssh", "variant"), ("submodule", "update"), ("imap", "tunnel"), ("init", "templatedir"),
    # whole sections: each key is a command line, or pulls in other configuration.
    ("alias", "*"), ("credential", "*"), ("include", "*"), ("includeif", "*"), ("pager", "*"),
    ("hook", "*"), ("sendemail", "*"), ("instaweb", "*"),
    # documentation and browsers.
    ("web", "browser"), ("browser", "cmd"), ("browser", "path"), ("help", "browser"),
    ("man", "viewer"), ("man", "cmd"), ("man", "path"),
    # git-lfs: custom transfer agents and extensions are programs.
    ("lfs", "path"), ("lfs", "clean"), ("lfs", "smudge"), ("lfs", "standalonetransferagent"),
)
#: A value that is itself a program to run: git's ``ext::`` transport (``remote.x.url``).
_GIT_EXEC_VALUE = re.compile(r"(?i)^\s*\"?\s*ext::")
_SECTION = re.compile(r'^\s*\[\s*([A-Za-z0-9.-]+)(?:\s+"((?:[^"\\]|\\.)*)")?\s*\]')
_KEY = re.compile(r"^\s*([A-Za-z][A-Za-z0-9-]*)\s*(=|$)")


def _git_exec_key(section: str, name: str, value: str) -> bool:
    section, name = section.lower(), name.lower()
    return any(section == want_section and fnmatch.fnmatchcase(name, want_key)
               for want_section, want_key in GIT_EXEC_KEYS) or bool(_GIT_EXEC_VALUE.match(value))


def git_config_runs_programs(text: str) -> list[str]:
    """The ``section.key`` entries of a git config that would make git run something.

    A forgiving reading of git's syntax (a UTF-8 BOM, ``[section.sub]``, keys after a
    header on the same line): when in doubt, a key counts. ``_git_exec_keys`` adds what
    git's own parser reads in the file.
    """
    found, section, prefix = [], "", ""
    for line in text.removeprefix("\ufeff").splitlines():
        header = _SECTION.match(line)
        if header:
            section, _, sub = header.group(1).partition(".")
            section = section.lower()
            sub = header.group(2) if header.group(2) is not None else sub.lower()
            prefix = f"{section}.{sub}." if sub else f"{section}."
            line = line[header.end():]
        key = _KEY.match(line)
        if not key:
            continue
        name = key.group(1).lower()
        if _git_exec_key(section, name, line[key.end():]):
            found.append(prefix + name)
    return found


def _git_parsed_exec_keys(path: str) -> list[str]:
    """The same, as git itself reads the file (``git config --file``, includes not followed)."""
    git = shutil.which("git")
    if git is None:
        return []
    try:
        listing = subprocess.run(
            [git, "config", "--file", path, "--no-includes", "--list", "--null"],
            capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1",
                 "HOME": "/nonexistent", "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for entry in listing.stdout.split(b"\0"):
        name, _, value = entry.decode("utf-8", "replace").partition("\n")
        section, _, rest = name.partition(".")
        if rest and _git_exec_key(section, rest.rpartition(".")[2], value):
            found.append(name)  # git prints section and key in lower case
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
        #: Mounted read-only over what existed: nothing there was written by the command (a
        #: repo's config the host changed just before the command is the user's own).
        self.read_only = tuple(p.path.rstrip("/") for p in self.plan.protections
                               if p.exists and p.action in (READ_ONLY, SCRUBBED))

    def untouchable(self, path: str) -> bool:
        return any(path == root or path.startswith(root + "/") for root in self.read_only)

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
                if self.untouchable(entry.path):
                    continue
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
        if name.endswith(BYTECODE_SUFFIXES):
            return _bytecode_would_run(directory, name, path, info)
        extension = next((s for s in importlib.machinery.EXTENSION_SUFFIXES
                          if name.endswith(s)), None)
        if extension and os.path.isfile(os.path.join(directory, name[:-len(extension)] + ".py")):
            return (f"an extension module beside {name[:-len(extension)]}.py: Python imports "
                    "it instead of the source")
        if directory == self.cwd and self.cwd is not None:
            stem = name.split(".")[0]
            if (name.endswith(".py") or re.fullmatch(r"[^.]+(\.[^.]+)?\.(so|pyd)", name)) \
                    and _shadows_importable(stem, self.cwd):
                return (f"shadows 'import {stem}' in the kernel's directory (IPython puts its "
                        "directory first on sys.path)")
        return ""


#: Bytecode files: ``.pyc`` (``.pyo`` is what Python 2 loaded, sourceless, with -O).
BYTECODE_SUFFIXES = (".pyc", ".pyo")
#: Past this size, cached bytecode is not compiled again to be compared: it is moved.
_BYTECODE_CHECK_MAX = 16 << 20


def _bytecode_would_run(directory: str, name: str, path: str, info: os.stat_result) -> str:
    """Why Python (or a tool on it) would run this new bytecode file instead of source.

    Outside ``__pycache__`` a ``NAME.pyc`` is imported as it is, without a source
    (``pkg/__init__.pyc`` makes a package); in ``__pycache__``, Python uses
    ``NAME.TAG.pyc`` for the ``NAME.py`` beside it when its header matches (or, for an
    unchecked hash-based file, always). So cached bytecode stays only when it is exactly
    what this Python compiles from that source; one with no source is never loaded. Moved
    cached bytecode costs only a compile at the next import.
    """
    if os.path.basename(directory) != "__pycache__":
        return ("bytecode outside __pycache__: Python imports it without a source "
                "(NAME.pyc, pkg/__init__.pyc)")
    stem, _, rest = name.partition(".")
    source = os.path.join(os.path.dirname(directory), stem + ".py")
    if not os.path.isfile(source):
        return ""  # never loaded: Python looks in __pycache__ only for a source it found
    tag = sys.implementation.cache_tag
    optimize = {f"{tag}.pyc": 0, f"{tag}.opt-1.pyc": 1, f"{tag}.opt-2.pyc": 2}.get(rest)
    if optimize is None:
        return (f"cached bytecode of another interpreter or tool for {stem}.py (pytest's "
                "assertion rewriting, another Python): it would run instead of the source")
    if not stat.S_ISREG(info.st_mode) or not _compiles_to(source, path, optimize):
        return (f"cached bytecode that is not what {stem}.py compiles to: Python would run "
                "it instead of the source")
    return ""


def _compiles_to(source: str, cached: str, optimize: int) -> bool:
    """Whether ``cached`` holds exactly the code this Python compiles from ``source``.

    Only compiles (never unmarshals what the command wrote). Seen here 2026-12-07:
    ``marshal.dumps(compile(...))`` matched the bytes Python 3.11 wrote for all 55
    modules of this package.
    """
    try:
        if os.path.getsize(source) > _BYTECODE_CHECK_MAX \
                or os.path.getsize(cached) > 2 * _BYTECODE_CHECK_MAX:
            return False
        with open(source, "rb") as handle:
            data = handle.read()
        with open(cached, "rb") as handle:
            header, body = handle.read(16), handle.read()
        if header[:4] != importlib.util.MAGIC_NUMBER:
            return False
        # The name the writer compiled with first: it is stored in the code (co_filename).
        for filename in dict.fromkeys([*_filenames_in(body, os.path.basename(source)), source]):
            code = compile(data, filename, "exec", dont_inherit=True, optimize=optimize)
            if marshal.dumps(code) == body:
                return True
        return False
    except (OSError, SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def _filenames_in(body: bytes, name: str, limit: int = 2) -> list[str]:
    """Paths ending in ``/name`` stored as strings in marshalled code, read from their length
    prefix only: the file name a tool compiled with (pip compiles a ``--target`` install
    in a temporary dir before moving it; seen here 2026-12-07)."""
    found: list[str] = []
    tail = name.encode()
    start = body.find(tail)
    while start != -1 and len(found) < limit:
        end = start + len(tail)
        for begin in range(start, max(start - 4096, 0), -1):
            size = end - begin
            short = begin >= 2 and body[begin - 1] == size and size < 256 \
                and body[begin - 2] & 0x7F in b"zZ"
            long = begin >= 5 and body[begin - 5] & 0x7F in b"aAu" \
                and int.from_bytes(body[begin - 4:begin], "little") == size
            if short or long:
                text = body[begin:end].decode("utf-8", "replace")
                if text == name or text.endswith("/" + name):
                    found.append(text)
                break
        start = body.find(tail, end)
    return found


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
            found = git_config_runs_programs(handle.read(1 << 20))
    except OSError:
        return []
    return list(dict.fromkeys(found + _git_parsed_exec_keys(path)))


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


def epilogue(result: CommandResult | None, *, working_dir: str | None, since: float,
             plan: ProtectionPlan | None, isolated: bool = True,
             mounted: ProtectionPlan | None = None, etc_scrubbed: Sequence[str] = (),
             extra: Mapping[str, object] | None = None) -> None:
    """After an isolated command: ``check_after_run`` (set-ID bits stripped, what would run
    later on the host quarantined), and what the result says about it.

    Runs on every outcome, ``result`` None when there is none (the command raised): the
    check is never skipped. ``plan``: what the check compares with (the one the command
    ran under). ``mounted``: the plan a warm sandbox was started with, and
    ``etc_scrubbed`` the /etc files its layout scrubbed: the result says what it protected
    (``protection_details``); None for a one-shot, whose backend's layout said it.
    ``extra``: more details, put after those and before the check's. Nothing for a
    command that ran on the host (``isolated`` False).
    """
    if not isolated:
        return
    after = check_after_run(working_dir, since, plan)
    if result is None:
        return
    if mounted is not None:
        result.details.update(protection_details(mounted, etc_scrubbed))
    result.details.update(extra or {})
    result.details.update(after)
