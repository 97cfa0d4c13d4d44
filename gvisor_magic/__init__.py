"""Run shell commands from Jupyter inside a gVisor sandbox, and say honestly when you can't.

The runner core (this package minus ``notebook/``) does not import IPython.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .aio import AsyncIsolatedSession, CommandStream, OutputChunk, arun, astream
    from .detect import EnvironmentInfo, HostFacts
    from .egress.policy import NetworkPolicy
    from .errors import (
        CommandCancelled,
        CommandInterrupted,
        GvisorMagicError,
        InvalidRequestError,
        IsolationUnavailable,
        SandboxStartError,
    )
    from .request import Limits, SandboxSpec
    from .result import CommandResult
    from .runner import detect_environment, is_gvisor_available, run_command_isolated
    from .session import IsolatedSession

# The public names and their modules, imported on first use: `import gvisor_magic` (and
# so `python -m gvisor_magic.install`, which is stdlib only) needs none of the dependencies.
_LAZY = {
    "AsyncIsolatedSession": "aio", "CommandStream": "aio", "OutputChunk": "aio",
    "arun": "aio", "astream": "aio",
    "EnvironmentInfo": "detect", "HostFacts": "detect",
    "CommandCancelled": "errors", "CommandInterrupted": "errors", "GvisorMagicError": "errors",
    "InvalidRequestError": "errors", "IsolationUnavailable": "errors",
    "SandboxStartError": "errors",
    "Limits": "request", "SandboxSpec": "request", "NetworkPolicy": "egress.policy",
    "CommandResult": "result",
    "detect_environment": "runner", "is_gvisor_available": "runner",
    "run_command_isolated": "runner",
    "IsolatedSession": "session",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gvisor_magic' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# A library does not print: results carry every decision, and applications
# (or `kubectl logs`) see the "gvisor" log lines once they configure logging.
logging.getLogger("gvisor_magic").addHandler(logging.NullHandler())

__all__ = [
    "AsyncIsolatedSession",
    "CommandCancelled",
    "CommandInterrupted",
    "CommandResult",
    "CommandStream",
    "EnvironmentInfo",
    "GvisorMagicError",
    "HostFacts",
    "InvalidRequestError",
    "IsolatedSession",
    "IsolationUnavailable",
    "Limits",
    "NetworkPolicy",
    "OutputChunk",
    "SandboxSpec",
    "SandboxStartError",
    "__version__",
    "arun",
    "astream",
    "detect_environment",
    "is_gvisor_available",
    "load_ipython_extension",
    "run_command_isolated",
    "status_widget",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext gvisor_magic``: register ``%%isolated``, ``%isolated`` and ``%isolation``."""
    from .notebook.magics import IsolatedMagics

    if "IsolatedMagics" in ipython.magics_manager.registry:
        return
    magics = IsolatedMagics(ipython, parent=ipython)
    ipython.register_magics(magics)
    ipython.configurables.append(magics.settings)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext gvisor_magic``: remove the magics and restore ``!`` exactly."""
    magics = ipython.magics_manager.registry.pop("IsolatedMagics", None)
    if magics is None:
        return
    magics.router.uninstall()
    magics.sessions.close()
    for kind, names in (("line", ("isolated", "isolation")), ("cell", ("isolated",))):
        table = ipython.magics_manager.magics[kind]
        for name in names:
            table.pop(name, None)
    if magics.settings in ipython.configurables:
        ipython.configurables.remove(magics.settings)


def status_widget():
    """The live isolation-status widget of the running IPython kernel."""
    from IPython import get_ipython

    ipython = get_ipython()
    if ipython is None:
        raise RuntimeError("status_widget() needs a running IPython (a notebook or ipython)")
    load_ipython_extension(ipython)
    return ipython.magics_manager.registry["IsolatedMagics"].status_widget()
