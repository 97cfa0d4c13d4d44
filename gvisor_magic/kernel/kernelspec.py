"""The ``python3-gvisor`` kernelspec: install, remove, and say where it is."""

from __future__ import annotations

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
    """Install (or replace) the kernelspec; the directory it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as staging:
        os.chmod(staging, 0o755)
        with open(os.path.join(staging, "kernel.json"), "w") as handle:
            json.dump(kernel_json(config), handle, indent=1)
        return KernelSpecManager().install_kernel_spec(
            staging, KERNEL_NAME, user=user, prefix=prefix)  # it always replaces (8.x)


def remove() -> str | None:
    """Remove the kernelspec wherever Jupyter finds it; the directory removed, or None."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        return KernelSpecManager().remove_kernel_spec(KERNEL_NAME)
    except (NoSuchKernel, KeyError):
        return None


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
