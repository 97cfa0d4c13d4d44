"""The OCI bundle a sandboxed command runs in: what it can see, and as whom.

The rootfs is an empty directory of ours, read-only; everything the command can
see is mounted into it explicitly: the host's system directories and Python
read-only, a curated ``/etc``, the working directory read-write at the same
path, ``repo_path`` read-only, a private ``/tmp`` and ``HOME``. What is not in
this list (``/root``, other homes, ``/var/run/secrets``, the Docker socket,
``/etc/shadow``) does not exist inside.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
from dataclasses import dataclass, field

from ..request import CommandRequest, sandbox_env

# Top-level host directories shared read-only. Merged-/usr symlinks (/bin ->
# usr/bin) are recreated as symlinks instead of being mounted.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# /etc entries worth having: name resolution, dynamic linker, TLS roots, time
# zone, Debian alternatives. Never shadow/gshadow/sudoers/ssh keys.
ETC_ALLOWLIST = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
    "os-release", "debian_version", "lsb-release", "ssl", "ca-certificates",
    "ca-certificates.conf", "mime.types", "protocols", "services", "nsswitch.conf",
    "inputrc", "bash.bashrc", "profile", "environment", "gitconfig", "python3",
    "pip.conf", "xdg", "magic", "magic.mime", "locale.alias", "manpath.config", "npmrc",
)
_ETC_COPY_MAX = 1 << 20

STATUS_DIR = "/run/gvisor-magic"

# Credentials that commonly sit at the top of a home directory. When a mounted
# directory (often the notebook's cwd, often $HOME) holds them, they are hidden
# behind empty read-only stand-ins: the sandbox gets the project, not the keys.
SECRET_NAMES = (".ssh", ".aws", ".azure", ".gnupg", ".docker", ".kube", ".config/gcloud",
                ".netrc", ".git-credentials", ".pypirc", ".npmrc",
                ".jupyter/jupyter_server_config.json")


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


@dataclass
class Bundle:
    """An OCI bundle directory for one sandbox, written by ``write``."""

    path: str
    request: CommandRequest
    identity: Identity
    process_args: list[str]
    status_dir: str
    hostname: str = "gvisor-sandbox"
    mounts: list[dict[str, object]] = field(default_factory=list)
    #: Secret paths hidden inside mounted directories (see ``SECRET_NAMES``).
    masked: list[str] = field(default_factory=list)

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    def write(self) -> None:
        os.makedirs(self.rootfs, mode=0o755)
        self._system_mounts()
        self._etc()
        self._private_mounts()
        self._user_mounts()
        # Parents before children (stable), so nested mounts land on top.
        self.mounts.sort(key=lambda m: str(m["destination"]).rstrip("/").count("/"))
        spec = self.spec()
        config = os.path.join(self.path, "config.json")
        # The spec carries the caller's env values: readable by the caller only.
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(spec, handle)

    def spec(self) -> dict[str, object]:
        request, ident = self.request, self.identity
        path_dirs = [os.path.dirname(sys.executable), "/usr/local/sbin", "/usr/local/bin",
                     "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        path = ":".join(dict.fromkeys(path_dirs))
        env = sandbox_env(request, home=ident.home, path=path, user=ident.user)
        namespaces = [{"type": t} for t in ("pid", "mount", "uts", "ipc", "network")]
        linux: dict[str, object] = {"namespaces": namespaces}
        if ident.rootless:
            namespaces.append({"type": "user"})
            linux["uidMappings"] = list(ident.uid_mappings)
            linux["gidMappings"] = list(ident.gid_mappings)
        rlimits = [{"type": name, "hard": value, "soft": value}
                   for name, value in request.limits.rlimits().items()]
        no_caps: list[str] = []
        return {
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": True},
            "hostname": self.hostname,
            "process": {
                "terminal": False,
                "user": {"uid": ident.uid, "gid": ident.gid},
                "args": self.process_args,
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": request.working_dir or "/",
                "capabilities": {k: no_caps for k in
                                 ("bounding", "effective", "inheritable", "permitted", "ambient")},
                "noNewPrivileges": True,
                "rlimits": rlimits,
            },
            "mounts": self.mounts,
            "linux": linux,
        }

    # -- mounts ---------------------------------------------------------------

    def _mount(self, destination: str, kind: str, source: str, options: list[str]) -> None:
        target = os.path.join(self.rootfs, destination.lstrip("/"))
        if not os.path.lexists(target):
            if kind == "bind" and os.path.isfile(source):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
            else:
                os.makedirs(target, exist_ok=True)
        self.mounts.append({"destination": destination, "type": kind, "source": source,
                            "options": options})

    def _bind(self, path: str, *, writable: bool = False) -> None:
        mode = "rw" if writable else "ro"
        self._mount(path, "bind", path, ["rbind", mode, "nosuid", "nodev"])

    def _system_mounts(self) -> None:
        self._mount("/proc", "proc", "proc", [])
        self._mount("/dev", "tmpfs", "tmpfs", ["nosuid", "mode=755"])
        self._mount("/dev/shm", "tmpfs", "shm", ["nosuid", "nodev", "mode=1777", "size=64m"])
        self._mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"])
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                os.symlink(os.readlink(path), os.path.join(self.rootfs, path.lstrip("/")))
            elif os.path.isdir(path):
                self._bind(path)
        for prefix in python_prefixes():
            self._bind(prefix)

    def _etc(self) -> None:
        etc = os.path.join(self.rootfs, "etc")
        os.makedirs(etc, exist_ok=True)
        for name in ETC_ALLOWLIST:
            source = os.path.join("/etc", name)
            target = os.path.join(etc, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
            elif os.path.isdir(source):
                self._bind(source)
            elif os.path.isfile(source) and os.path.getsize(source) <= _ETC_COPY_MAX:
                try:
                    shutil.copyfile(source, target)
                except OSError:
                    continue
        ident = self.identity
        users = {"root": (0, 0, "/root"), ident.user: (ident.uid, ident.gid, ident.home),
                 "nobody": (65534, 65534, "/nonexistent")}
        with open(os.path.join(etc, "passwd"), "w") as handle:
            for name, (uid, gid, home) in users.items():
                handle.write(f"{name}:x:{uid}:{gid}:{name}:{home}:/bin/sh\n")
        with open(os.path.join(etc, "group"), "w") as handle:
            groups = {"root": 0, ident.user: ident.gid, "nogroup": 65534}
            for name, gid in groups.items():
                handle.write(f"{name}:x:{gid}:\n")
        with open(os.path.join(etc, "hostname"), "w") as handle:
            handle.write(self.hostname + "\n")
        with open(os.path.join(etc, "hosts"), "w") as handle:
            handle.write(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{self.hostname}\n")
        resolv = os.path.join(etc, "resolv.conf")
        if self.request.network and os.path.isfile("/etc/resolv.conf"):
            shutil.copyfile("/etc/resolv.conf", resolv)
        else:
            open(resolv, "w").close()

    def _private_mounts(self) -> None:
        limits = self.request.limits
        ident = self.identity
        self._mount("/tmp", "tmpfs", "tmpfs",
                    ["nosuid", "nodev", "mode=1777", f"size={limits.tmp_size}"])
        self._mount(ident.home, "tmpfs", "tmpfs",
                    ["nosuid", "nodev", "mode=0700", f"uid={ident.uid}", f"gid={ident.gid}",
                     f"size={limits.tmp_size}"])
        self._mount(STATUS_DIR, "bind", self.status_dir, ["rbind", "rw", "nosuid", "nodev"])

    def _user_mounts(self) -> None:
        request = self.request
        wanted = []
        if request.working_dir:
            wanted.append((request.working_dir, True))
        if request.repo_path:
            wanted.append((request.repo_path, False))
        # Parents first, so a read-only repo inside a writable working dir (or
        # the other way round) ends up as asked.
        for path, writable in sorted(wanted, key=lambda item: item[0].count("/")):
            self._bind(path, writable=writable)
            self._mask_secrets(path)

    def _mask_secrets(self, directory: str) -> None:
        empty = os.path.join(self.path, "empty")
        for name in SECRET_NAMES:
            secret = os.path.join(directory, name)
            if os.path.isdir(secret) and not os.path.islink(secret):
                self.mounts.append({"destination": secret, "type": "tmpfs", "source": "tmpfs",
                                    "options": ["ro", "nosuid", "nodev", "size=4k", "mode=000"]})
            elif os.path.isfile(secret) or os.path.islink(secret):
                if not os.path.exists(empty):
                    os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o400))
                self.mounts.append({"destination": secret, "type": "bind", "source": empty,
                                    "options": ["rbind", "ro", "nosuid", "nodev"]})
            else:
                continue
            self.masked.append(secret)
