"""Render a ``SandboxLayout`` as an OCI bundle for ``runsc run``.

The rootfs is an empty directory of ours, read-only; everything the command can
see is mounted into it as the layout says (see ``layout.py``).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass

from ..request import Limits
from .layout import MountSpec, SandboxLayout

_BIND_FLAGS = ["rbind", "nosuid", "nodev"]
# Provided by the OCI runtime's conventions rather than by the layout.
_RUNTIME_MOUNTS = (
    MountSpec("/dev", "tmpfs", "tmpfs", False, ("nosuid", "mode=755")),
    MountSpec("/dev/shm", "tmpfs", "shm", False, ("nosuid", "nodev", "mode=1777", "size=64m")),
    MountSpec("/proc", "proc", "proc", False),
    MountSpec("/sys", "sysfs", "sysfs", True, ("nosuid", "noexec", "nodev")),
)


@dataclass
class Bundle:
    """An OCI bundle directory for one sandbox, written by ``write``."""

    path: str
    layout: SandboxLayout
    process_args: list[str]
    limits: Limits
    #: The host's own network (``network="host"``): no network namespace of its own.
    host_network: bool = False
    #: Capabilities (in gVisor's kernel) the init process starts with; a warm session's
    #: agent needs a few to seal itself off and drops them all before any command runs.
    init_capabilities: tuple[str, ...] = ()
    #: The init's uid when not the caller's (the agent starts as root of the sandbox).
    init_uid: int | None = None

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    def write(self) -> None:
        os.makedirs(self.rootfs, mode=0o755)
        for link, target in self.layout.symlinks.items():
            os.symlink(target, os.path.join(self.rootfs, link.lstrip("/")))
        mounts = [self._mount(spec) for spec in
                  sorted([*_RUNTIME_MOUNTS, *self.layout.mounts],
                         key=lambda m: m.destination.rstrip("/").count("/"))]
        config = os.path.join(self.path, "config.json")
        # The spec carries the caller's env values: readable by the caller only.
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.spec(mounts), handle)

    def _mount(self, spec: MountSpec) -> dict[str, object]:
        target = os.path.join(self.rootfs, spec.destination.lstrip("/"))
        if not os.path.lexists(target):
            # Pre-create every mount point, even under another mount: runsc's gofer
            # prepares binds in this directory on the host, and what it creates
            # there itself belongs to the sandbox's uid (which an ordinary user
            # cannot delete afterwards).
            if spec.kind == "bind" and os.path.isfile(spec.source):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
            else:
                os.makedirs(target, exist_ok=True)
        if spec.kind == "bind":
            options = [*_BIND_FLAGS, "ro" if spec.read_only else "rw"]
        else:
            options = list(spec.options) + (["ro"] if spec.read_only else [])
        return {"destination": spec.destination, "type": spec.kind, "source": spec.source,
                "options": options}

    def spec(self, mounts: list[dict[str, object]]) -> dict[str, object]:
        layout, ident = self.layout, self.layout.identity
        # network="host": no network namespace of its own, so runsc's --network=host
        # really is the host's network (with one, it would see an empty namespace).
        kinds = ("pid", "mount", "uts", "ipc") + (() if self.host_network else ("network",))
        namespaces = [{"type": t} for t in kinds]
        linux: dict[str, object] = {"namespaces": namespaces, "seccomp": no_setid_seccomp()}
        if ident.rootless:
            namespaces.append({"type": "user"})
            linux["uidMappings"] = list(ident.uid_mappings)
            linux["gidMappings"] = list(ident.gid_mappings)
        rlimits = [{"type": name, "hard": value, "soft": value}
                   for name, value in self.limits.rlimits().items()]
        caps = [f"CAP_{name}" for name in self.init_capabilities]
        return {
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": True},
            "hostname": layout.hostname,
            "process": {
                "terminal": False,
                "user": {"uid": ident.uid if self.init_uid is None else self.init_uid,
                         "gid": ident.gid},
                "args": self.process_args,
                "env": [f"{k}={v}" for k, v in layout.env.items()],
                "cwd": layout.cwd,
                "capabilities": {k: caps if k in ("bounding", "effective", "permitted") else []
                                 for k in ("bounding", "effective", "inheritable", "permitted",
                                           "ambient")},
                "noNewPrivileges": True,
                "rlimits": rlimits,
            },
            "mounts": mounts,
            "linux": linux,
        }


_S_ISUID, _S_ISGID, _O_CREAT, _O_TMPFILE_BIT = 0o4000, 0o2000, 0o100, 0o20000000


def no_setid_seccomp() -> dict[str, object]:
    """A filter that refuses (EPERM) to give a file set-user-ID or set-group-ID bits.

    The working dir is a real host directory: a set-ID file made there (``cp
    /bin/sh x; chmod 4755 x``) would be a set-ID program on the host, owned by
    the caller (root, often). gVisor applies this filter to every process of the
    container (``runsc --oci-seccomp``), so such a file is never created; the
    runner's host-side check (``gvisor_magic.setid``) stays as a second layer.
    ``openat2`` takes its mode in a struct a filter cannot read, so it answers
    ENOSYS and callers fall back to ``openat``.
    """
    def refuse(name: str, *conditions: tuple[int, int]) -> dict[str, object]:
        return {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                "args": [{"index": index, "value": bits, "valueTwo": bits,
                          "op": "SCMP_CMP_MASKED_EQ"} for index, bits in conditions]}

    legacy = platform.machine() in ("x86_64", "AMD64")  # arm64 has only the *at calls
    rules = [{"names": ["openat2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    for bit in (_S_ISUID, _S_ISGID):
        rules += [refuse("fchmod", (1, bit)), refuse("fchmodat", (2, bit)),
                  refuse("mknodat", (2, bit))]
        if legacy:
            rules += [refuse("chmod", (1, bit)), refuse("creat", (1, bit)),
                      refuse("mknod", (1, bit))]
        for created in (_O_CREAT, _O_TMPFILE_BIT):  # a mode only counts when creating
            rules.append(refuse("openat", (2, created), (3, bit)))
            if legacy:
                rules.append(refuse("open", (1, created), (2, bit)))
    arch = "SCMP_ARCH_X86_64" if legacy else "SCMP_ARCH_AARCH64"
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch], "syscalls": rules}
