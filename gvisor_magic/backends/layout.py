"""What a sandboxed command can see, independent of the backend that enforces it.

The runsc backend renders this layout as OCI mounts, the Docker backend as
Docker mounts; keeping the policy here means both sandboxes show a command the
same world: the host's system directories and Python read-only, a curated
``/etc``, the working directory read-write at the same path, ``repo_path``
read-only, a private ``/tmp`` and ``HOME``. Anything not listed (``/root``,
other homes, ``/var/run/secrets``, the Docker socket, ``/etc/shadow``) does not
exist inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..protected import (
    HIDDEN,
    SCRUBBED,
    ProtectionPlan,
    plan_for,
    protection_details,
    scrub_config_text,
)
from ..request import SandboxSpec, sandbox_env
from ..stand_ins import StandIns

# Top-level host directories shared read-only. Merged-/usr symlinks (/bin ->
# usr/bin) are recreated as symlinks instead of being mounted.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# /etc entries worth having: name resolution, dynamic linker, TLS roots, time
# zone, Debian alternatives. Never shadow/gshadow/sudoers/ssh keys. Of /etc/ssl only what
# a TLS client reads (``ETC_SSL_DIRS``, OpenSSL's ``*.cnf``), never ``private/``.
ETC_ALLOWLIST = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
    "os-release", "debian_version", "lsb-release", "ssl", "ca-certificates",
    "ca-certificates.conf", "mime.types", "protocols", "services", "nsswitch.conf",
    "inputrc", "bash.bashrc", "profile", "gitconfig", "python3",
    "pip.conf", "xdg", "magic", "magic.mime", "locale.alias", "manpath.config", "npmrc",
)
# Copied with credentials stripped (proxy passwords, registry tokens): see ``scrub_config_text``.
# /etc/environment is not copied at all: only PAM reads it, and it holds proxies with passwords.
ETC_SCRUBBED = frozenset({"gitconfig", "pip.conf", "npmrc"})
_ETC_COPY_MAX = 1 << 20
# In /etc/ssl: the trust store (Debian's hashed links in ``certs/`` point into
# /usr/share/ca-certificates, shown with /usr). Top-level files are copied when they are
# OpenSSL configuration or certificates (Alpine's ``cert.pem``) holding no private key.
ETC_SSL_DIRS = ("certs",)
_ETC_SSL_FILES = (".cnf", ".pem", ".crt")
# Bound /etc directories are searched for private keys (a server's key+certificate PEM in
# /etc/ssl/certs, say); a dir holding one is copied, each key as an empty file.
_PRIVATE_KEY = b"PRIVATE KEY-----"
_KEY_SCAN_MAX = 4 << 20

STATUS_DIR = "/run/gvisor-magic"
#: The sandbox's own tmpfs that holds the copy-on-write layer (``sandboxed/cow_layer.py``).
LAYER_DIR = "/run/gvisor-magic-layer"

@dataclass(frozen=True)
class Identity:
    """Who the command runs as inside, and how that maps to the host."""

    uid: int
    gid: int
    user: str
    home: str
    #: OCI uid/gid mappings for an ordinary user (empty when running as root).
    uid_mappings: tuple[dict[str, int], ...] = ()
    gid_mappings: tuple[dict[str, int], ...] = ()

    @property
    def rootless(self) -> bool:
        return bool(self.uid_mappings)


def caller_identity() -> Identity:
    """The caller's own uid/gid, so files written in the working dir belong to them.

    An ordinary user needs a user namespace. gVisor's own processes need a uid
    0 inside it: with a subordinate range in /etc/subuid (and ``newuidmap``),
    0 maps to that range and the command keeps the caller's uid; without one,
    the caller is mapped to 0 inside, which still writes files as the caller.
    """
    uid, gid = os.getuid(), os.getgid()
    try:
        entry = pwd.getpwuid(uid)
        user, home = entry.pw_name, entry.pw_dir or "/tmp/home"
    except KeyError:
        user, home = f"u{uid}", "/tmp/home"
    if home in ("/", "") or home.startswith(("/proc", "/sys", "/dev", "/tmp/")):
        home = "/tmp/home"
    if uid == 0:
        return Identity(0, 0, user, home)
    sub_uid = _subordinate_start("/etc/subuid", user, uid)
    sub_gid = _subordinate_start("/etc/subgid", user, uid)
    if sub_uid is not None and sub_gid is not None and shutil.which("newuidmap") \
            and shutil.which("newgidmap"):
        return Identity(
            uid, gid, user, home,
            ({"containerID": 0, "hostID": sub_uid, "size": 1},
             {"containerID": uid, "hostID": uid, "size": 1}),
            ({"containerID": 0, "hostID": sub_gid, "size": 1},
             {"containerID": gid, "hostID": gid, "size": 1}),
        )
    return Identity(0, 0, "root", home,
                    ({"containerID": 0, "hostID": uid, "size": 1},),
                    ({"containerID": 0, "hostID": gid, "size": 1},))


def _subordinate_start(path: str, user: str, uid: int) -> int | None:
    try:
        with open(path) as handle:
            for line in handle:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)) and int(parts[2]) >= 1:
                    return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


def python_prefixes() -> list[str]:
    """Directories that make the kernel's own Python (and venv) work inside."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    prefixes = []
    for path in sorted(os.path.realpath(p) for p in candidates):
        if path in ("/", "") or any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS):
            continue
        if os.path.isdir(path) and not any(path.startswith(p + "/") for p in prefixes):
            prefixes.append(path)
    return prefixes


def init_python() -> str:
    """The interpreter that runs the sandbox init: our own, by its real path."""
    return os.path.realpath(sys.executable)


@dataclass(frozen=True)
class MountSpec:
    """One mount, in terms both OCI and Docker understand."""

    destination: str
    kind: str  # "bind" | "tmpfs" | "proc" | "sysfs"
    source: str = ""
    read_only: bool = True
    #: tmpfs options (size=, mode=, uid=, gid=); binds take only read_only.
    options: tuple[str, ...] = ()


@dataclass
class SandboxLayout:
    """Mounts, top-level symlinks, environment and identity for one sandbox."""

    identity: Identity
    env: dict[str, str]
    cwd: str
    mounts: list[MountSpec] = field(default_factory=list)
    #: Merged-/usr links such as /bin -> usr/bin (a backend may bind the target instead).
    symlinks: dict[str, str] = field(default_factory=dict)
    #: What ``gvisor_magic.protected`` asked for, and the host-side stand-ins it took.
    plan: ProtectionPlan = field(default_factory=ProtectionPlan)
    stand_ins: StandIns = field(default_factory=StandIns)
    hostname: str = "gvisor-sandbox"
    #: Host /etc files shown with their credentials stripped ("/etc/pip.conf").
    etc_scrubbed: list[str] = field(default_factory=list)

    def details(self) -> dict[str, str]:
        """What the result should say about the protection this sandbox had."""
        return protection_details(self.plan, self.etc_scrubbed)

    def release(self) -> None:
        """Remove the stand-ins no other sandbox holds; call when the sandbox has ended."""
        self.stand_ins.release()

    def sorted_mounts(self) -> list[MountSpec]:
        """Parents before children (stable), so nested mounts land on top."""
        return sorted(self.mounts, key=lambda m: m.destination.rstrip("/").count("/"))


def build_layout(spec: SandboxSpec, env: Mapping[str, str], identity: Identity, scratch: str,
                 *, host_system: bool = True, status_dir: str | None = None) -> SandboxLayout:
    """Build the layout of a sandbox for ``spec``, whose processes start in its working dir
    with ``env`` over the allowlisted base; the generated ``/etc`` and stand-in files go
    under ``scratch``.

    ``host_system=False`` is for a real image that brings its own system
    directories: then only the private and user mounts are added.
    """
    path_dirs = [os.path.dirname(sys.executable)] if host_system else []
    path_dirs += ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    env = sandbox_env(env, home=identity.home, path=":".join(dict.fromkeys(path_dirs)),
                      user=identity.user)
    layout = SandboxLayout(identity, env, spec.working_dir or "/", hostname=spec.hostname)
    env.setdefault("HOSTNAME", layout.hostname)  # Docker sets it: the same on every backend
    mounts = layout.mounts
    if host_system:
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                layout.symlinks[path] = os.readlink(path)
            elif os.path.isdir(path):
                mounts.append(MountSpec(path, "bind", path))
        for prefix in python_prefixes():
            mounts.append(MountSpec(prefix, "bind", prefix))
        etc = os.path.join(scratch, "etc")
        mounts.extend(write_etc(etc, identity, spec.network.mode == "host", layout.hostname,
                                scrubbed=layout.etc_scrubbed))
        mounts.append(MountSpec("/etc", "bind", etc))
    size = f"size={spec.limits.tmp_size}"
    mounts.append(MountSpec("/tmp", "tmpfs", "tmpfs", False, ("mode=1777", size)))
    mounts.append(MountSpec(identity.home, "tmpfs", "tmpfs", False,
                            ("mode=0700", f"uid={identity.uid}", f"gid={identity.gid}", size)))
    if status_dir is not None:
        mounts.append(MountSpec(STATUS_DIR, "bind", status_dir, read_only=False))
    wanted = []
    if spec.working_dir:
        # Held writes: the host's folder is only the layer's lower, read-only to the sandbox.
        wanted.append((spec.working_dir, spec.holds_writes))
    if spec.holds_writes:
        memory = f"size={spec.limits.memory}" if spec.limits.memory else size
        mounts.append(MountSpec(LAYER_DIR, "tmpfs", "tmpfs", False, ("mode=0700", memory)))
    if spec.repo_path:
        wanted.append((spec.repo_path, True))
    for path, read_only in sorted(wanted, key=lambda item: item[0].count("/")):
        mounts.append(MountSpec(path, "bind", path, read_only))
    layout.plan = spec.plan if spec.plan is not None else plan_for(spec)
    try:
        _protect(layout, scratch)
    except BaseException:
        layout.release()
        raise
    for path in spec.python_path:
        if not any(path == m.destination or path.startswith(m.destination.rstrip("/") + "/")
                   for m in mounts if m.kind == "bind"):
            mounts.append(MountSpec(path, "bind", path))
    if spec.kernel_dir:
        # Last, so that it is mounted over whatever hides other sandboxes' state there.
        mounts.append(MountSpec(spec.kernel_dir, "bind", spec.kernel_dir, read_only=False))
    return layout


def layer_setting(spec: SandboxSpec, identity: Identity) -> str:
    """The init's LAYER argument (``sandboxed/cow_layer.py``): "" when writes land directly."""
    if not spec.holds_writes:
        return ""
    return json.dumps({"dir": spec.working_dir, "base": LAYER_DIR, "uid": identity.uid,
                       "size": spec.limits.memory})


#: What the sandbox's init needs to mount the layer and then become the caller.
LAYER_CAPABILITIES = ("SYS_ADMIN", "SETUID", "SETPCAP", "CHOWN", "FOWNER", "DAC_OVERRIDE",
                      "DAC_READ_SEARCH", "KILL")


def _protect(layout: SandboxLayout, scratch: str) -> None:
    """Mount the plan: read-only binds, hidden tmpfs/empty files, scrubbed copies.

    Missing read-only paths get host stand-ins first (``stand_ins.py``); one that
    cannot be made is watched after the command instead, never a failed start.
    """
    plan = layout.plan
    missing = [(p.path, p.kind) for p in plan.protections if not p.exists]
    failed = set(layout.stand_ins.acquire(missing)) if missing else set()
    if failed:
        plan.watched.extend((path, "protected path (no stand-in possible)")
                            for path, _ in failed)
    empty = os.path.join(scratch, "empty")
    scrubbed = os.path.join(scratch, "scrubbed")
    for index, item in enumerate(plan.protections):
        if (item.path, item.kind) in failed:
            continue
        if item.action == HIDDEN and item.kind == "dir":
            layout.mounts.append(MountSpec(item.path, "tmpfs", "tmpfs", True,
                                           ("mode=000", "size=4k")))
        elif item.action == HIDDEN:
            if not os.path.exists(empty):
                os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o400))
            layout.mounts.append(MountSpec(item.path, "bind", empty))
        elif item.action == SCRUBBED and item.text is not None:
            os.makedirs(scrubbed, 0o700, exist_ok=True)
            copy = os.path.join(scrubbed, str(index))
            with open(copy, "w", encoding="utf-8") as handle:
                handle.write(item.text)
            os.chmod(copy, 0o444)
            layout.mounts.append(MountSpec(item.path, "bind", copy))
        else:
            layout.mounts.append(MountSpec(item.path, "bind", item.path))


def write_etc(etc: str, identity: Identity, host_network: bool, hostname: str, *,
              scrubbed: list[str] | None = None, host_etc: str = "/etc") -> list[MountSpec]:
    """Write the sandbox's ``/etc`` into ``etc``; return the host /etc dirs to bind over it
    (read-only). A dir holding a private key is copied instead, the key as an empty file.
    ``scrubbed`` gets the /etc paths whose credentials were stripped."""
    os.makedirs(etc, exist_ok=True)
    directories = []
    for name in ETC_ALLOWLIST:
        source = os.path.join(host_etc, name)
        target = os.path.join(etc, name)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif name == "ssl" and os.path.isdir(source):
            directories.extend(_write_etc_ssl(source, target))
        elif os.path.isdir(source):
            os.makedirs(target, exist_ok=True)  # the mount point
            directories.append(source)
        elif os.path.isfile(source) and os.path.getsize(source) <= _ETC_COPY_MAX:
            try:
                if name in ETC_SCRUBBED:
                    with open(source, encoding="utf-8", errors="replace") as handle:
                        original = handle.read()
                    text = scrub_config_text(original)
                    with open(target, "w", encoding="utf-8") as handle:
                        handle.write(text)
                    if text != original and scrubbed is not None:
                        scrubbed.append(os.path.join("/etc", name))
                else:
                    shutil.copyfile(source, target)
            except OSError:
                continue
    users = {"root": (0, 0, "/root"), identity.user: (identity.uid, identity.gid, identity.home),
             "nobody": (65534, 65534, "/nonexistent")}
    groups = {"root": 0, identity.user: identity.gid, "nogroup": 65534}
    files = {
        "passwd": "".join(f"{n}:x:{u}:{g}:{n}:{h}:/bin/sh\n" for n, (u, g, h) in users.items()),
        "group": "".join(f"{n}:x:{g}:\n" for n, g in groups.items()),
        "hostname": hostname + "\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n",
        "resolv.conf": "",
    }
    if host_network and os.path.isfile("/etc/resolv.conf"):
        with open("/etc/resolv.conf") as handle:
            files["resolv.conf"] = handle.read()
    for name, text in files.items():
        with open(os.path.join(etc, name), "w") as handle:
            handle.write(text)
    mounts = []
    for directory in directories:
        keys = _private_keys_in(directory)
        if keys:
            # Copied without them: a file mounted over a key inside the host's dir would make
            # runsc create that file on the host if the key went away before the sandbox
            # started (seen here 2026-12-07: empty files left in /etc/ssl/certs).
            _copy_without(directory, os.path.join(etc, os.path.relpath(directory, host_etc)),
                          set(keys))
        else:
            mounts.append(MountSpec(directory, "bind", directory))
    return mounts


def _copy_without(source: str, target: str, keys: set[str]) -> None:
    """Copy ``source`` into ``target``: links as links, ``keys`` as empty files."""
    os.makedirs(target, exist_ok=True)
    with contextlib.suppress(OSError), os.scandir(source) as entries:
        for entry in entries:
            copy = os.path.join(target, entry.name)
            with contextlib.suppress(OSError):
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), copy)
                elif entry.is_dir():
                    _copy_without(entry.path, copy, keys)
                elif entry.path in keys:
                    os.close(os.open(copy, os.O_CREAT | os.O_WRONLY, 0o444))
                elif entry.is_file():
                    shutil.copyfile(entry.path, copy)


def _write_etc_ssl(source: str, target: str) -> list[str]:
    """/etc/ssl without ``private/``: the trust store dirs to bind, OpenSSL's configuration
    and top-level certificates copied; links kept as links (Fedora's ``certs ->
    ../pki/tls/certs`` dangles: /etc/pki is not shown)."""
    os.makedirs(target, exist_ok=True)
    directories = []
    try:
        entries = list(os.scandir(source))
    except OSError:
        return directories
    for entry in entries:
        path, copy = entry.path, os.path.join(target, entry.name)
        if entry.name == "private":
            continue  # a server's keys, as a dir or as a link to one
        try:
            if entry.is_symlink():
                os.symlink(os.readlink(path), copy)
            elif entry.is_dir() and entry.name in ETC_SSL_DIRS:
                os.makedirs(copy, exist_ok=True)  # the mount point
                directories.append(path)
            elif entry.is_file() and entry.name.endswith(_ETC_SSL_FILES) \
                    and entry.stat().st_size <= _ETC_COPY_MAX and not _holds_private_key(path):
                shutil.copyfile(path, copy)
        except OSError:
            continue
    return directories


def _private_keys_in(directory: str) -> list[str]:
    """Regular files below ``directory`` that hold a PEM private key (links not followed:
    their targets are either shown read-only anyway, as /usr is, or absent inside)."""
    found, pending = [], [directory]
    while pending:
        with contextlib.suppress(OSError), os.scandir(pending.pop()) as entries:
            for entry in entries:  # the types come with the listing: links cost no stat
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and _key_in_entry(entry):
                    found.append(entry.path)
    return found


#: (inode, size, mtime) of a file last read for a key -> whether it held one: a sandbox's
#: start reads only what changed since the last (the CA bundle is ~200 KB).
_KEY_SEEN: dict[str, tuple[tuple[int, int, int], bool]] = {}


def _key_in_entry(entry: os.DirEntry) -> bool:
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return True  # not readable to us: not shown either
    stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
    seen = _KEY_SEEN.get(entry.path)
    if seen is not None and seen[0] == stamp:
        return seen[1]
    holds = _holds_private_key(entry.path)
    if len(_KEY_SEEN) > 4096:
        _KEY_SEEN.clear()
    _KEY_SEEN[entry.path] = (stamp, holds)
    return holds


def _holds_private_key(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return _PRIVATE_KEY in handle.read(_KEY_SCAN_MAX)
    except OSError:
        return True  # unreadable to us: not shown either
