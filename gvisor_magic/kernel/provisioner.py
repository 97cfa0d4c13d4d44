"""The ``jupyter_client`` kernel provisioner of "Python 3 (gVisor)" (``gvisor-provisioner``).

It is ``LocalProvisioner`` with three changes:

- before anything starts, it checks that a runsc sandbox can run here and raises with the
  reason and the fix if not, so the notebook shows why and no kernel runs (fail closed);
- the kernel's five ZMQ sockets are IPC sockets in a private directory (mode 0700, one per
  kernel, named so no other sandbox's mounts show it), which is the only host directory
  besides the notebook's own that the kernel's sandbox may create sockets in; the
  connection file (and its key) is copied there, out of Jupyter's runtime dir, which
  sandboxes never see;
- the command is ``python -m gvisor_magic.kernel.launch``, which runs the kernelspec's own
  command (ipykernel) inside the sandbox.

Settings come from the kernelspec's ``metadata.kernel_provisioner.config`` (see the README,
"A whole kernel in gVisor"): ``network``, ``allow_hosts``, ``limits``, ``protected_paths``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from tornado.web import HTTPError
from traitlets import Bool, Dict, List, Unicode, Union

#: A socket path is at most 107 bytes: ``DIR/k-N`` must fit.
MAX_DIR = 80


def sockets_base() -> str:
    """Where kernels' private dirs go: the temporary dir, or /tmp when that is too deep."""
    base = tempfile.gettempdir()
    return base if len(base) <= MAX_DIR - 30 else "/tmp"


class GvisorKernelUnavailable(HTTPError, RuntimeError):
    """No gVisor kernel can start here. An ``HTTPError``, because that is what
    jupyter_server's API puts in its reply (``APIHandler.write_error``): the notebook then
    shows the reason, not "Unhandled error"."""

    def __init__(self, why: str) -> None:
        # tornado formats log_message with %: a reason is never a format string.
        super().__init__(500, why.replace("%", " percent"),
                         reason="Python 3 (gVisor) cannot start here")


def unavailable() -> str | None:
    """Why no gVisor kernel can start here, with the fix; None when one can."""
    from ..runner import REGISTRY

    status = REGISTRY.status("runsc")
    if status.available:
        return None
    return (f"Python 3 (gVisor) cannot start: runsc is not usable here ({status.reason})"
            + (f". Fix: {status.fix}" if status.fix else "")
            + ". No kernel was started: this kernel never runs outside gVisor.")


class GvisorProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Starts the kernel inside a gVisor sandbox; refuses where gVisor cannot run."""

    network = Union([Bool(), Unicode(), List(Unicode())], default_value=False,
                    config=True, help="off (False), True (public addresses through the "
                    "filtering proxy), a preset such as 'pypi', hosts, or a list of them")
    allow_hosts = List(Unicode(), config=True, help="hosts added to the network allowlist")
    limits = Dict(config=True, help="limits, e.g. {'memory': '2G', 'max_processes': 256}")
    protected_paths = List(Unicode(), config=True, help="protected-path rules")

    sockets_dir: str | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        why = unavailable()
        if why is not None:
            self.log.error("gvisor: %s", why)
            raise GvisorKernelUnavailable(why)
        km = self.parent
        if self.sockets_dir is None or not os.path.isdir(self.sockets_dir):
            self.sockets_dir = tempfile.mkdtemp(prefix="gvisor-magic-kernel-",
                                                dir=sockets_base())
        if km is not None:
            km.transport = "ipc"
            km.cache_ports = False
            km.ip = os.path.join(self.sockets_dir, "k")
        kwargs = await super().pre_launch(**kwargs)
        cmd: list[str] = list(kwargs["cmd"])
        inside = os.path.join(self.sockets_dir, "connection.json")
        if km is not None and km.connection_file:
            shutil.copyfile(km.connection_file, inside)
            os.chmod(inside, 0o600)
            cmd = [inside if arg == km.connection_file else arg for arg in cmd]
        launcher = [sys.executable, "-m", "gvisor_magic.kernel.launch",
                    "--sockets", self.sockets_dir,
                    "--working-dir", os.path.realpath(kwargs.get("cwd") or os.getcwd())]
        network = self.network
        if network is True:
            launcher += ["--network", "public"]
        elif isinstance(network, str) and network:
            launcher += ["--network", network]
        elif isinstance(network, list) and network:
            launcher += ["--network", ",".join(network)]
        for host in self.allow_hosts:
            launcher += ["--allow-host", host]
        for name, value in self.limits.items():
            launcher += ["--limit", f"{name}={value}"]
        for rule in self.protected_paths:
            launcher += ["--protect", rule]
        kwargs["cmd"] = [*launcher, "--", *cmd]
        self.log.info("gvisor: starting the kernel in a gVisor sandbox (sockets in %s)",
                      self.sockets_dir)
        return kwargs

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart and self.sockets_dir is not None:
            shutil.rmtree(self.sockets_dir, ignore_errors=True)
            self.sockets_dir = None
