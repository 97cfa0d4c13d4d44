"""The ``python3-gvisor`` kernelspec: install, remove, and say where it is."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidRequestError
from ..request import SandboxSpec, with_named_settings
from . import DISPLAY_NAME, KERNEL_NAME, PROVISIONER_NAME

#: The sandbox settings a kernelspec may carry: the provisioner's traits, named as
#: ``SandboxSpec.from_options`` names them, and ``sandbox``, any other setting by name
#: (``NAMED_SETTINGS``); the rest is fixed when the kernel starts.
SETTINGS = ("network", "allow_hosts", "limits", "protected_paths", "writes", "sandbox")
#: The provisioner's own settings, not the sandbox's: ``pool``, how many kernels of the
#: same recipe the server keeps started ahead of need (``pool.py``; 1 unless set).
OPTIONS = ("pool",)


def check_config(config: Mapping[str, Any]) -> SandboxSpec:
    """``check_settings`` for a kernelspec's whole provisioner config (``OPTIONS`` too)."""
    pool = config.get("pool", 1)
    if isinstance(pool, bool) or not isinstance(pool, int) or not 0 <= pool <= 8:
        raise InvalidRequestError(f"pool must be a whole number from 0 to 8, not {pool!r}")
    return check_settings({k: v for k, v in config.items() if k not in OPTIONS})


def check_settings(config: Mapping[str, Any]) -> SandboxSpec:
    """The sandbox ``config`` describes (no working dir yet); bad settings raise
    ``InvalidRequestError`` (``TypeError`` for a value of the wrong kind)."""
    for name in config:
        if name not in SETTINGS:
            raise InvalidRequestError(f"unknown kernel setting {name!r}: expected one of "
                                      f"{', '.join(SETTINGS + OPTIONS)}")
    return SandboxSpec.from_options(with_named_settings(config))


def kernel_json(config: Mapping[str, Any] | None = None,
                python: str | None = None) -> dict[str, Any]:
    """The kernelspec: this environment's ipykernel, started by the gVisor provisioner.

    ``config`` becomes the provisioner's settings (``SETTINGS`` and ``OPTIONS``), checked
    here and kept as written. Interrupts are messages on the control channel: no signal has
    to reach a process inside the sandbox.
    """
    check_config(config or {})
    return {
        "argv": [python or sys.executable, "-m", "ipykernel_launcher", "-f",
                 "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME,
                                   "config": dict(config or {})},
        },
    }


def install(*, user: bool = False, prefix: str | None = None,
            config: Mapping[str, Any] | None = None) -> str:
    """Install (or replace) the kernelspec, and enable the server extension that starts
    its pooled kernels as a Jupyter server starts (``prestart.py``) in the matching
    config dir; the directory the kernelspec went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as staging:
        os.chmod(staging, 0o755)
        with open(os.path.join(staging, "kernel.json"), "w") as handle:
            json.dump(kernel_json(config), handle, indent=1)
        where = KernelSpecManager().install_kernel_spec(
            staging, KERNEL_NAME, user=user, prefix=prefix)  # it always replaces (8.x)
    enable_prestart(prestart_config_dir(user=user, prefix=prefix))
    return where


def prestart_config_dir(*, user: bool = False, prefix: str | None = None) -> str:
    """The Jupyter config dir that goes with a kernelspec installed with these options,
    as ``jupyter server extension enable`` chooses it (``--user``, ``--sys-prefix``, or
    the system's), ``PREFIX/etc/jupyter`` for a prefix."""
    from jupyter_core.paths import SYSTEM_CONFIG_PATH, jupyter_config_dir

    if user:
        return jupyter_config_dir()
    if prefix is not None:
        return os.path.join(prefix, "etc", "jupyter")
    return SYSTEM_CONFIG_PATH[0]


def _prestart_file(config_dir: str) -> str:
    from .prestart import EXTENSION

    return os.path.join(config_dir, "jupyter_server_config.d", f"{EXTENSION}.json")


def enable_prestart(config_dir: str) -> str:
    """Enable the extension for servers reading ``config_dir``; the file written. (The
    file ``jupyter server extension enable`` writes; a server without this package
    installed ignores it with a warning.)"""
    from .prestart import EXTENSION

    path = _prestart_file(config_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"ServerApp": {"jpserver_extensions": {EXTENSION: True}}}, handle, indent=2)
    return path


def remove() -> str | None:
    """Remove the kernelspec wherever Jupyter finds it, and the extension's enabling
    wherever ``install`` wrote it; the kernelspec's directory removed, or None."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from jupyter_core.paths import jupyter_config_path

    try:
        removed = KernelSpecManager().remove_kernel_spec(KERNEL_NAME)
    except (NoSuchKernel, KeyError):
        removed = None
    config_dirs = list(jupyter_config_path())
    if removed is not None:  # PREFIX/share/jupyter/kernels/NAME: PREFIX/etc/jupyter too
        prefix = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(removed))))
        config_dirs.append(os.path.join(prefix, "etc", "jupyter"))
    for config_dir in config_dirs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_prestart_file(config_dir))
    return removed


def installed() -> str | None:
    """Where Jupyter finds the kernelspec, or None."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KernelSpecManager().find_kernel_specs().get(KERNEL_NAME)


def readiness(runsc_usable: bool, runsc_reason: str) -> tuple[bool, str]:
    """Whether the gVisor kernel can start here, and why (for ``doctor``)."""
    import importlib.util

    missing = [name for name in ("ipykernel", "jupyter_client")
               if importlib.util.find_spec(name) is None]
    if missing:
        return False, (f"{' and '.join(missing)} not installed "
                       "(pip install 'gvisor-magic[kernel]')")
    if not runsc_usable:
        return False, f"runsc is not usable here ({runsc_reason}); it never runs elsewhere"
    return True, "runsc works here, and ipykernel and jupyter_client are installed"
