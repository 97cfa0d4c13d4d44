"""Render a ``SandboxLayout`` as an OCI bundle for ``runsc run``.

The rootfs is an empty directory of ours, read-only; everything the command can
see is mounted into it as the layout says (see ``layout.py``).
"""

from __future__ import annotations

import json
import os
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
        namespaces = [{"type": t} for t in ("pid", "mount", "uts", "ipc", "network")]
        linux: dict[str, object] = {"namespaces": namespaces}
        if ident.rootless:
            namespaces.append({"type": "user"})
            linux["uidMappings"] = list(ident.uid_mappings)
            linux["gidMappings"] = list(ident.gid_mappings)
        rlimits = [{"type": name, "hard": value, "soft": value}
                   for name, value in self.limits.rlimits().items()]
        no_caps: list[str] = []
        return {
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": True},
            "hostname": layout.hostname,
            "process": {
                "terminal": False,
                "user": {"uid": ident.uid, "gid": ident.gid},
                "args": self.process_args,
                "env": [f"{k}={v}" for k, v in layout.env.items()],
                "cwd": layout.cwd,
                "capabilities": {k: no_caps for k in
                                 ("bounding", "effective", "inheritable", "permitted", "ambient")},
                "noNewPrivileges": True,
                "rlimits": rlimits,
            },
            "mounts": mounts,
            "linux": linux,
        }
