"""Protected paths: what a sandboxed command may not change, and what it may not read.

The working dir is a real host directory, and on a hosted JupyterHub it is the
user's home. A command that may write there could plant code that a host tool
runs later, outside the sandbox, with the user's tokens and network: a git hook
or ``core.fsmonitor``, a shell start-up file, an IPython start-up file, a
``.pth`` in the user site. And the same directory holds credentials. This
module is the one policy for both sides, shared by every backend and by warm
sessions:

- **read-only** inside the sandbox, whether the path exists or not: git's
  config, hooks and info of every repository found in a writable mount, and
  home-level configuration that something runs (``HOME_PROTECTED``);
- **hidden** (read and write denied): credentials at any depth, through
  symlinks (``SECRET_NAMES``, ``SECRET_PATHS``), Jupyter's runtime dir (kernel
  connection files and server tokens), the running kernel's connection file;
- **scrubbed**: configuration that tools inside need but that may embed
  credentials (a repo's ``.git/config``, ``.npmrc``, ``pip.conf``) is shown
  read-only with URL passwords and token lines removed.

What a mount cannot prevent (a file that did not exist and whose empty
stand-in would change how a host tool behaves, a repository the command
creates) is caught after the command by ``gvisor_magic.postrun``.

``plan_protection`` only looks (stdlib only, no side effects); ``plan_for`` asks it about a
sandbox's mounts, the layout (``backends/layout.py``) turns the plan into mounts and
stand-ins, and ``protection_details`` is what a result says about it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import stand_ins
from .errors import InvalidRequestError

ENV_PROTECTED = "GVISOR_MAGIC_PROTECTED_PATHS"
ENV_QUARANTINE = "GVISOR_MAGIC_QUARANTINE_DIR"

READ_ONLY = "read-only"
HIDDEN = "hidden"
SCRUBBED = "scrubbed"

#: Home-level files and directories that a host tool reads and runs: relative
#: path -> (kind, why). Read-only in every writable mount that is (or holds) a
#: home; existing ones also at the top of any writable mount.
HOME_PROTECTED: dict[str, tuple[str, str]] = {
    **{name: ("file", "shell start-up file") for name in (
        ".bashrc", ".bash_profile", ".bash_login", ".bash_logout", ".profile", ".zshrc",
        ".zshenv", ".zprofile", ".zlogin", ".zlogout", ".kshrc", ".mkshrc", ".cshrc",
        ".tcshrc", ".login", ".logout", ".inputrc", ".xprofile", ".xsessionrc", ".xinitrc",
        ".pam_environment")},
    ".bashrc.d": ("dir", "shell start-up files"),
    ".config/fish": ("dir", "shell start-up files"),
    ".config/environment.d": ("dir", "session environment"),
    ".gitconfig": ("file", "git configuration (runs fsmonitor, hooksPath, aliases)"),
    ".config/git": ("dir", "git configuration (runs fsmonitor, hooksPath, aliases)"),
    ".ipython": ("dir", "IPython profiles and start-up files"),
    ".jupyter": ("dir", "Jupyter configuration (Python run by the server)"),
    ".local/share/jupyter": ("dir", "Jupyter kernelspecs and extensions"),
    ".local/etc/jupyter": ("dir", "Jupyter configuration"),
    ".local/bin": ("dir", "programs on the login PATH"),
    ".local/lib/python*/site-packages": ("dir", "Python user site (.pth files run at start)"),
    ".config/pip": ("dir", "pip configuration"),
    ".pip": ("dir", "pip configuration"),
    ".npmrc": ("file", "npm configuration (script-shell, node-options)"),
    ".yarnrc": ("file", "yarn configuration"),
    ".yarnrc.yml": ("file", "yarn configuration"),
    ".condarc": ("file", "conda configuration"),
    ".ssh": ("dir", "ssh keys and authorized_keys"),
    ".kube": ("dir", "Kubernetes credentials and exec plugins"),
    ".docker": ("dir", "Docker credentials and helpers"),
    ".vscode": ("dir", "editor tasks run when a folder opens"),
    ".idea": ("dir", "editor run configurations"),
    ".config/autostart": ("dir", "desktop autostart entries"),
    ".config/systemd": ("dir", "user services"),
    ".vimrc": ("file", "editor start-up file"),
    ".vim": ("dir", "editor plugins"),
    ".config/nvim": ("dir", "editor start-up files"),
    ".emacs": ("file", "editor start-up file"),
    ".emacs.d": ("dir", "editor start-up files"),
    ".Rprofile": ("file", "R start-up file"),
    ".julia/config": ("dir", "Julia start-up file"),
}

#: Missing entries that get an empty stand-in while the sandbox runs, because a
#: host tool reads them on its own (a git extension polling ``git status``, a new
#: kernel, any new Python, a terminal, sshd), and empty behaves exactly as absent.
#: Other missing entries are caught after the command (``gvisor_magic.postrun``):
#: an empty ``.bash_profile`` would make bash skip ``.profile``.
STAND_INS = frozenset({
    ".gitconfig", ".bashrc", ".profile", ".zshrc", ".zshenv", ".config/git", ".ipython",
    ".jupyter", ".local/share/jupyter", ".local/bin", ".local/lib/python*/site-packages", ".ssh",
})

#: Inside a ``.git`` directory: what git runs or obeys.
GIT_PROTECTED: dict[str, tuple[str, str]] = {
    "config": ("file", "git configuration (fsmonitor, hooksPath, aliases, filters)"),
    "config.worktree": ("file", "git configuration"),
    "hooks": ("dir", "git hooks"),
    "info": ("dir", "git attributes and excludes"),
}
#: Next to a ``.git``: read-only when they exist.
PROJECT_PROTECTED: dict[str, tuple[str, str]] = {
    ".gitmodules": ("file", "git submodule definitions"),
    ".vscode": ("dir", "editor tasks run when a folder opens"),
    ".idea": ("dir", "editor run configurations"),
}

#: Credentials by name, hidden wherever they are found (files or directories).
SECRET_NAMES = frozenset({
    ".ssh", ".gnupg", ".aws", ".azure", ".docker", ".kube", ".netrc", ".git-credentials",
    ".pypirc", ".pgpass", ".my.cnf", ".vault-token", ".databrickscfg", "kaggle.json", ".kaggle",
    ".boto", ".s3cfg", ".terraformrc", "credentials.tfrc.json", ".dockercfg", ".authinfo",
    ".authinfo.gpg", ".password-store", ".env", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519",
    ".htpasswd",
})
#: ``.env.local`` and friends are secrets; these templates are not.
_ENV_TEMPLATES = frozenset({".env.example", ".env.sample", ".env.template", ".env.dist"})
#: Credentials by relative path, hidden below any directory the scan visits.
SECRET_PATHS = (
    ".config/gcloud", ".config/gh", ".config/hub", ".config/rclone", ".config/git/credentials",
    ".cache/huggingface/token", ".cache/huggingface/stored_tokens", ".huggingface/token",
    ".local/share/jupyter/runtime", ".local/share/keyrings", ".jupyter/jupyter_server_config.json",
    ".jupyter/jupyter_notebook_config.json",
)
#: Configuration shown read-only with credentials stripped (tools inside need the rest).
SCRUBBED_NAMES = frozenset({".npmrc", ".yarnrc", ".yarnrc.yml", ".condarc", "pip.conf",
                            "pip.ini"})

#: Directories the scan does not descend into: third-party trees and caches, where
#: a user keeps no credentials of their own (named in SECURITY.md).
SKIP_DIRS = frozenset({"node_modules", "__pycache__", "site-packages", "dist-packages", ".tox",
                       ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".cache"})
#: The scan's bound: past it the plan says it is incomplete (never silent).
MAX_SCAN_ENTRIES = 200_000
#: Bind mounts a sandbox can take: runsc 20240729 failed to start here with about 250 of
#: them in one bundle (tmpfs mounts, which hide directories, were fine by the hundreds). Past
#: these budgets the command is refused, never run half-protected (or moved to the host).
MAX_PROTECTED_BINDS = 192
MAX_PROTECTED = 1024

_UNSAFE_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]*(?::[^/@\s]*)?@")
#: anaconda.org-style channels carry the token as a path segment:
#: ``https://conda.anaconda.org/t/<token>/<channel>`` (also as a bare ``channel_alias``).
_URL_PATH_TOKEN = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s\"'<>]+(?:/[^/\s\"'<>?#]+)*?)"
                             r"/t/[^/\s\"'<>?#]+(?=[/\s\"'<>?#]|$)")
#: A query parameter that carries a credential: ``?token=``, ``&access_token=``, ``?sig=``...
_URL_QUERY_SECRET = re.compile(
    r"(?i)([?&])((?:[a-z0-9_.-]*(?:token|auth|passw|secret|credential|api[-_]?key|key|sig"
    r"|signature)[a-z0-9_.-]*))=[^&#\s\"'<>]*&?")
_SECRET_KEY = re.compile(
    r"(?i)(token|auth|passw|secret|credential|extraheader|api[-_]?key|private[-_]?key|cookie)")


class ProtectionError(InvalidRequestError):
    """The protection policy cannot be applied: the command is refused, never run unprotected."""


@dataclass(frozen=True)
class PathPolicy:
    """The user's changes to the built-in policy.

    ``extra`` entries are made read-only (relative to each writable mount, or
    absolute); ``relaxed`` entries name built-in entries that no longer apply,
    as they are written in the lists above (``.bashrc``, ``.vscode``, ``.ssh``).
    """

    extra: tuple[str, ...] = ()
    relaxed: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str] | None) -> PathPolicy:
        """``["-.bashrc", "data/raw"]``: a leading ``-`` relaxes, anything else adds."""
        if entries is None:
            return cls()
        if isinstance(entries, str):
            raise TypeError("protected_paths must be a list of str, not one str")
        extra: list[str] = []
        relaxed: list[str] = []
        for entry in entries:
            if not isinstance(entry, str):
                raise TypeError(f"protected_paths entries must be str, got {entry!r}")
            text = entry.strip()
            if "\0" in text:
                raise InvalidRequestError(f"protected path {entry!r} contains a NUL byte")
            target = relaxed if text.startswith("-") else extra
            name = text[1:].strip() if text.startswith("-") else text.removeprefix("+").strip()
            name = name.rstrip("/") or name
            if not name or name in (".", ".."):
                raise InvalidRequestError(
                    f"protected path {entry!r} names nothing: use a relative path such as "
                    "'data/raw', an absolute path, or '-NAME' to relax a built-in entry")
            if name not in target:
                target.append(name)
        return cls(tuple(extra), tuple(relaxed))

    @classmethod
    def from_env(cls) -> PathPolicy:
        """``$GVISOR_MAGIC_PROTECTED_PATHS``: entries separated by ``:``."""
        raw = os.environ.get(ENV_PROTECTED, "")
        return cls.parse([part for part in raw.split(":") if part.strip()])

    def merged(self, other: PathPolicy) -> PathPolicy:
        return PathPolicy(tuple(dict.fromkeys(self.extra + other.extra)),
                          tuple(dict.fromkeys(self.relaxed + other.relaxed)))

    def relaxes(self, name: str) -> bool:
        return name in self.relaxed or name.split("/")[-1] in self.relaxed


@dataclass(frozen=True)
class Protection:
    """One path the sandbox may not change (``read-only``) or not see (``hidden``)."""

    path: str
    action: str
    exists: bool
    kind: str
    why: str
    #: For ``scrubbed``: the text the sandbox sees instead of the file's.
    text: str | None = None
    #: Comes and goes without the user (other sandboxes' state): not part of ``key``.
    volatile: bool = False


@dataclass
class ProtectionPlan:
    """What the layout must mount, and what the post-run check must watch."""

    protections: list[Protection] = field(default_factory=list)
    #: Protected files that are missing and get no stand-in: checked after the command.
    watched: list[tuple[str, str]] = field(default_factory=list)
    #: Protected entries that are symlinks: (path, target) restored if the command replaces them.
    links: list[tuple[str, str]] = field(default_factory=list)
    relaxed: tuple[str, ...] = ()
    complete: bool = True
    note: str | None = None

    def key(self) -> frozenset[tuple[str, str]]:
        """What a warm sandbox was built with: a change means it must be replaced."""
        return frozenset((p.path, p.action) for p in self.protections
                         if (p.exists or p.action == READ_ONLY) and not p.volatile)

    def by_action(self, action: str) -> list[str]:
        return [p.path for p in self.protections if p.action == action]


def scrub_config_text(text: str) -> str:
    """Configuration text without credentials: URL credentials and token lines removed.

    Works on git config, pip.conf, .npmrc, .yarnrc(.yml), .condarc and /etc files
    alike: a line whose key mentions a token, password, secret, credential or auth
    header is dropped; in every URL, ``scheme://user:password@host`` becomes
    ``scheme://host``, an anaconda.org-style ``/t/<token>`` path segment is removed
    and query parameters such as ``?token=`` or ``&sig=`` are dropped.
    """
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        key = re.split(r"[=:]", stripped, maxsplit=1)[0]
        if stripped.lstrip("\"'").startswith("//"):
            # npm's "//registry/:_authToken=..." and yarn 1's '"//registry/:_authToken" x'.
            key = stripped
        if not stripped.startswith(("[", "#", ";")) and _SECRET_KEY.search(key):
            continue
        if stripped.startswith("[") and re.search(r"(?i)^\[\s*credential", stripped):
            kept.append(line)
            continue
        kept.append(_scrub_urls(line))
    return "\n".join(kept) + ("\n" if text.endswith("\n") else "")


def _scrub_urls(line: str) -> str:
    line = _UNSAFE_URL.sub(r"\1", line)
    previous = None
    while previous != line:  # one /t/<token> segment per pass: URLs may hold several
        previous, line = line, _URL_PATH_TOKEN.sub(r"\1", line)
    original = line
    previous = None
    while previous != line:
        previous, line = line, _URL_QUERY_SECRET.sub(r"\1", line)
    if line != original:  # "?token=x" leaves "?", "a=1&token=x" leaves "a=1&"
        line = re.sub(r"[?&](?=[#\s\"'<>,\]]|$)", "", line)
    return line


def _has_credentials(text: str) -> bool:
    return scrub_config_text(text) != text


def jupyter_runtime_dirs() -> list[str]:
    """Where Jupyter keeps kernel connection files and server tokens for this user."""
    dirs = []
    if os.environ.get("JUPYTER_RUNTIME_DIR"):
        dirs.append(os.environ["JUPYTER_RUNTIME_DIR"])
    data = os.environ.get("JUPYTER_DATA_DIR") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "jupyter")
    dirs.append(os.path.join(data, "runtime"))
    return dirs


def kernel_connection_file() -> str | None:
    """The running kernel's connection file (``-f PATH`` on its command line), if any."""
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            argv = handle.read(65536).split(b"\0")
    except OSError:
        argv = [a.encode() for a in sys.argv]
    for index, arg in enumerate(argv):
        text = arg.decode("utf-8", "surrogateescape")
        for flag in ("-f", "--f", "--IPKernelApp.connection_file", "--connection-file"):
            if text == flag and index + 1 < len(argv):
                return argv[index + 1].decode("utf-8", "surrogateescape")
            if text.startswith(flag + "="):
                return text.split("=", 1)[1]
    return None


def quarantine_root() -> str:
    """Where quarantined files go: ``$GVISOR_MAGIC_QUARANTINE_DIR`` or the user's cache."""
    configured = os.environ.get(ENV_QUARANTINE)
    if configured:
        return os.path.realpath(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.realpath(os.path.join(cache, "gvisor-magic", "quarantine"))


def default_homes() -> list[str]:
    """Home directories on this machine: ``$HOME``, the caller's and every passwd entry's."""
    homes = {os.path.expanduser("~"), os.environ.get("HOME", "")}
    try:
        # Looked up again only when the user database changes (a warm session scans before
        # every command; reading and resolving every entry was a third of that scan).
        homes.update(_passwd_homes(os.stat("/etc/passwd").st_mtime_ns))
    except OSError:
        homes.update(_passwd_homes(None))
    return sorted(os.path.realpath(h) for h in homes if h and h not in ("/", "/nonexistent"))


@functools.lru_cache(maxsize=4)
def _passwd_homes(_version: int | None) -> frozenset[str]:
    try:
        import pwd

        return frozenset(entry.pw_dir for entry in pwd.getpwall())
    except (ImportError, KeyError):  # pragma: no cover - not on Linux
        return frozenset()


def _inside(path: str, roots: Iterable[str]) -> str | None:
    for root in roots:
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return root
    return None


def _kind(info: os.stat_result) -> str:
    return "dir" if stat.S_ISDIR(info.st_mode) else "file"


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


class _Planner:
    def __init__(self, writable: list[str], readable: list[str], policy: PathPolicy,
                 homes: list[str], max_entries: int) -> None:
        self.writable, self.readable = writable, readable
        self.mounts = writable + readable
        self.policy = policy
        self.homes = homes
        self.max_entries = max_entries
        self.plan = ProtectionPlan(relaxed=policy.relaxed)
        self.seen: dict[str, Protection] = {}
        #: Our own empty stand-ins: they count as the missing paths they stand for.
        self.stand_ins = stand_ins.current()
        #: Where sandboxes keep their state (mounted only when the working dir holds it).
        self.state_dir = os.path.realpath(tempfile.gettempdir())
        self.entries = 0
        #: Real paths of the directories looked at, once per scan (most candidates share one).
        self.real_dirs: dict[str, str] = {}

    # -- adding -------------------------------------------------------------------

    def add(self, path: str, action: str, kind: str, why: str, *, name: str,
            stand_in: bool = False) -> None:
        """Protect ``path`` (as written, inside a mount), resolving symlinks safely.

        Mount destinations are real paths (no symlink components), so a link
        planted in the working dir can never redirect a mount.
        """
        if self.policy.relaxes(name):
            return
        info = None if path in self.stand_ins else _lstat(path)
        if info is None and action == HIDDEN:
            return  # nothing there to hide
        if info is not None and stat.S_ISLNK(info.st_mode):
            if _inside(path, self.writable) and (path, os.readlink(path)) not in self.plan.links:
                # The link itself sits in a writable dir: the command could swap it.
                self.plan.links.append((path, os.readlink(path)))
            target = os.path.realpath(path)
            if not _inside(target, self.mounts) or not os.path.exists(target):
                return  # it points outside every mount: nothing inside to see or change
            path, info = target, os.lstat(target)
        elif info is None:
            parent = os.path.dirname(path)
            real = self.real_dirs.get(parent)
            if real is None:
                real = self.real_dirs[parent] = os.path.realpath(parent)
            path = os.path.join(real, os.path.basename(path))
        if not _inside(path, self.mounts):
            return
        text = None
        if info is not None:
            kind = _kind(info)
            if action in (READ_ONLY, SCRUBBED) and kind == "file" and (
                    action == SCRUBBED or name.endswith("config")
                    or os.path.basename(path) in SCRUBBED_NAMES):
                text = self._scrubbed(path, info)
                action = SCRUBBED if text is not None else READ_ONLY
        elif action == SCRUBBED:
            action = READ_ONLY
        if action == READ_ONLY and not _inside(path, self.writable):
            return  # a read-only mount already
        if info is None and not stand_in:
            self.plan.watched.append((path, why))
            return
        previous = self.seen.get(path)
        if previous is not None and _RANK[previous.action] >= _RANK[action]:
            return
        self.seen[path] = Protection(path, action, info is not None, kind, why, text)

    def _scrubbed(self, path: str, info: os.stat_result) -> str | None:
        """The scrubbed text of a small config file, or None if it holds no credentials."""
        if not stat.S_ISREG(info.st_mode) or info.st_size > 1 << 20:
            return None
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            return None
        return scrub_config_text(text) if _has_credentials(text) else None

    # -- the rules ------------------------------------------------------------------------

    def home(self, home: str) -> None:
        for rel, (kind, why) in HOME_PROTECTED.items():
            for path in _expand(home, rel):
                stand_in = rel in STAND_INS
                self.add(path, READ_ONLY, kind, why, name=rel, stand_in=stand_in)

    def top_of_mount(self, root: str) -> None:
        """Existing home-level entries at the top of any writable mount (no stand-ins)."""
        for rel, (kind, why) in HOME_PROTECTED.items():
            if "*" not in rel:
                self.add(os.path.join(root, rel), READ_ONLY, kind, why, name=rel)

    def repo(self, top: str, dot_git: str, info: os.stat_result) -> None:
        """A repository found by the scan: its git dir's config and hooks, and its neighbours."""
        if stat.S_ISDIR(info.st_mode):
            gitdirs = [dot_git]
        else:
            self.add(dot_git, READ_ONLY, "file", "git dir pointer", name=".git")
            gitdirs = [d for d in [_gitdir_of(dot_git)] if d]
        for gitdir in gitdirs:
            self.gitdir(gitdir)
        for rel, (kind, why) in PROJECT_PROTECTED.items():
            self.add(os.path.join(top, rel), READ_ONLY, kind, why, name=rel)

    def gitdir(self, gitdir: str) -> None:
        for rel, (kind, why) in GIT_PROTECTED.items():
            self.add(os.path.join(gitdir, rel), READ_ONLY, kind, why, name=f".git/{rel}",
                     stand_in=kind == "dir" and os.path.isdir(gitdir))
        for sub in ("modules", "worktrees"):
            base = os.path.join(gitdir, sub)
            for found in _children(base):
                self.gitdir(os.path.join(base, found))

    def secrets_below(self, directory: str) -> None:
        for rel in SECRET_PATHS:
            candidate = os.path.join(directory, rel)
            if os.path.lexists(candidate):
                self.add(candidate, HIDDEN, "dir", "credentials", name=rel)

    def sandbox_state(self, entries: list[os.DirEntry]) -> list[os.DirEntry]:
        """In the temporary dir: other sandboxes' state (bundles hold their ``env=`` values)
        is hidden and not scanned; it comes and goes, so it does not count as a change."""
        kept = []
        for entry in entries:
            if entry.name.startswith(("gvisor-magic-", "gvm-stand-ins-")):
                self.seen[entry.path] = Protection(entry.path, HIDDEN, True, "dir" if entry.is_dir(
                    follow_symlinks=False) else "file", "another sandbox's state", volatile=True)
            else:
                kept.append(entry)
        return kept

    # -- the scan -------------------------------------------------------------------------

    def scan(self, root: str) -> None:
        """Visit ``root`` (without following links), finding repos and credentials."""
        pending = [root]
        self.secrets_below(root)
        while pending:
            directory = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            firsts = set()
            if directory == self.state_dir:
                entries = self.sandbox_state(entries)
            for entry in entries:
                self.entries += 1
                if self.entries > self.max_entries:
                    self.plan.complete = False
                    self.plan.note = (f"the scan for credentials and repositories stopped after "
                                      f"{self.max_entries} entries in {root}: deeper ones are "
                                      "not protected")
                    return
                name = entry.name
                if name in SECRET_NAMES or (name.startswith(".env.")
                                            and name not in _ENV_TEMPLATES):
                    self.add(entry.path, HIDDEN, "file", "credentials", name=name)
                    continue
                if name in SCRUBBED_NAMES:
                    self.add(entry.path, SCRUBBED, "file", "configuration with credentials",
                             name=name)
                if name == ".git":
                    with contextlib.suppress(OSError):
                        self.repo(directory, entry.path, entry.stat(follow_symlinks=False))
                    continue
                if name in (".cache", ".config", ".local", ".huggingface", ".jupyter"):
                    firsts.add(name)
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir and name not in SKIP_DIRS:
                    pending.append(entry.path)
            if firsts and directory != root:
                self.secrets_below(directory)


_RANK = {READ_ONLY: 0, SCRUBBED: 1, HIDDEN: 2}


def _expand(home: str, rel: str) -> list[str]:
    """``rel`` below ``home``; a ``python*`` part matches what exists plus this Python."""
    if "*" not in rel:
        return [os.path.join(home, rel)]
    parts = rel.split("/")
    index = next(i for i, part in enumerate(parts) if "*" in part)
    parent = os.path.join(home, *parts[:index])
    names = {f"python{sys.version_info.major}.{sys.version_info.minor}"}
    with contextlib.suppress(OSError):
        names.update(n for n in os.listdir(parent) if fnmatch.fnmatch(n, parts[index]))
    return [os.path.join(parent, name, *parts[index + 1:]) for name in sorted(names)]


def _children(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def _gitdir_of(pointer: str) -> str | None:
    """The directory a ``.git`` file points to (``gitdir: PATH``)."""
    try:
        with open(pointer, encoding="utf-8", errors="replace") as handle:
            line = handle.read(4096).strip()
    except OSError:
        return None
    if not line.startswith("gitdir:"):
        return None
    target = line.split(":", 1)[1].strip()
    target = os.path.join(os.path.dirname(pointer), target)
    real = os.path.realpath(target)
    return real if os.path.isdir(real) else None


def looks_like_home(directory: str, homes: Sequence[str]) -> bool:
    if directory in homes:
        return True
    return any(os.path.lexists(os.path.join(directory, name))
               for name in (".bashrc", ".profile", ".bash_profile", ".ipython", ".local"))


def plan_protection(writable: Sequence[str], readable: Sequence[str] = (),
                    policy: PathPolicy | None = None, *, homes: Sequence[str] | None = None,
                    max_entries: int = MAX_SCAN_ENTRIES) -> ProtectionPlan:
    """Find what must be read-only or hidden in these mounts (real paths, no side effects)."""
    policy = (policy or PathPolicy()).merged(PathPolicy.from_env())
    writable = [os.path.realpath(p) for p in writable if p]
    readable = [os.path.realpath(p) for p in readable if p]
    homes = [os.path.realpath(h) for h in (homes if homes is not None else default_homes())]
    planner = _Planner(writable, readable, policy, homes, max_entries)
    # Homes inside writable mounts (the mount itself, or homes below it, e.g. /home).
    for root in writable:
        planner.top_of_mount(root)
        for home in homes:
            if _inside(home, [root]):
                planner.home(home)
        if looks_like_home(root, homes) and root not in homes:
            planner.home(root)
    for root in writable + readable:
        planner.scan(root)
        if not planner.plan.complete:
            break
    # Jupyter's runtime dir and the running kernel's connection file, wherever they are.
    for runtime in jupyter_runtime_dirs():
        if os.path.lexists(runtime):
            planner.add(runtime, HIDDEN, "dir", "Jupyter kernel connection files and tokens",
                        name=".local/share/jupyter/runtime")
    connection = kernel_connection_file()
    if connection and os.path.lexists(connection):
        planner.add(os.path.abspath(connection), HIDDEN, "file",
                    "the running kernel's connection file", name="kernel connection file")
    quarantine = quarantine_root()
    if os.path.isdir(quarantine):
        planner.add(quarantine, HIDDEN, "dir", "quarantined files", name="quarantine")
    # The user's own entries.
    for entry in policy.extra:
        candidates = [entry] if os.path.isabs(entry) else [os.path.join(r, entry)
                                                           for r in writable]
        for candidate in candidates:
            planner.add(os.path.normpath(candidate), READ_ONLY, "dir", "listed by the user",
                        name=entry)
    # A hidden dir covers everything below it; read-only below hidden is moot.
    hidden = sorted(p.path for p in planner.seen.values() if p.action == HIDDEN
                    and p.kind == "dir")
    planner.plan.protections = sorted(
        (p for p in planner.seen.values()
         if not _inside(p.path, [h for h in hidden if h != p.path])),
        key=lambda p: (p.path.count("/"), p.path))
    covered = {p.path for p in planner.plan.protections}
    planner.plan.watched = [(path, why) for path, why in dict(planner.plan.watched).items()
                            if path not in covered]
    binds = [p for p in planner.plan.protections if not (p.action == HIDDEN and p.kind == "dir")]
    if len(binds) > MAX_PROTECTED_BINDS or len(planner.plan.protections) > MAX_PROTECTED:
        raise ProtectionError(
            f"{len(planner.plan.protections)} paths in {', '.join(writable + readable)} would "
            f"need protecting ({len(binds)} of them files or read-only paths; a sandbox takes "
            f"at most {MAX_PROTECTED_BINDS}): the command was not run. Run it in a smaller "
            "directory (for example the project's own), or relax entries with "
            "protected_paths=['-NAME']")
    return planner.plan


class Mounted(Protocol):
    """What a plan is made from: a ``request.SandboxSpec`` (which imports this module)."""

    working_dir: str | None
    repo_path: str | None
    protection: PathPolicy


def plan_for(spec: Mounted) -> ProtectionPlan:
    """The protection plan for this sandbox's mounts: its working dir (writable) and
    repository (read-only), under its ``protection`` policy."""
    return plan_protection([spec.working_dir] if spec.working_dir else [],
                           [spec.repo_path] if spec.repo_path else [],
                           spec.protection)


def protection_details(plan: ProtectionPlan, etc_scrubbed: Sequence[str] = ()
                       ) -> dict[str, str]:
    """What a result says about its sandbox's protection; ``etc_scrubbed``: the host /etc
    files its layout showed without their credentials (``SandboxLayout.etc_scrubbed``)."""
    details = {}
    if plan.by_action(HIDDEN):
        details["masked_secrets"] = ", ".join(plan.by_action(HIDDEN))
    protected = plan.by_action(READ_ONLY) + plan.by_action(SCRUBBED)
    if protected:
        details["protected"] = ", ".join(sorted(protected))
    if plan.by_action(SCRUBBED) or etc_scrubbed:
        details["scrubbed"] = ", ".join([*plan.by_action(SCRUBBED), *etc_scrubbed])
    if plan.relaxed:
        details["relaxed_protection"] = ", ".join(plan.relaxed)
    if plan.note:
        details["protection_note"] = plan.note
    return details
