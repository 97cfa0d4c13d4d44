"""Every backend, in one table.

A row says how a backend runs one command (a ``backends.base.Backend``) and, if it
can, how it keeps a sandbox warm for ``IsolatedSession`` (a ``backends.base.Transport``).
Classes are named here and imported on first use, so this module sits at the bottom
of the package (``request`` takes the mode names from it) and a backend whose
library is missing costs nothing until it is asked for.

Adding a backend: its module under ``backends/``, one row here, and where ``auto``
should place it in ``detect.preferred_backends``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendEntry:
    name: str
    #: ``module:Class`` under ``gvisor_magic.backends``.
    backend: str
    #: The warm-session transport, ``module:Class``; None: this backend runs one-shot only.
    transport: str | None = None
    #: The distribution its module needs, named in the fix when it is missing.
    requires: str | None = None


TABLE = (
    BackendEntry("runsc", "runsc:RunscBackend", "transports:RunscTransport"),
    BackendEntry("docker", "docker:DockerBackend", "transports:DockerTransport",
                 requires="docker"),
    BackendEntry("subprocess", "subprocess:SubprocessBackend"),
)
NAMES = tuple(entry.name for entry in TABLE)
_BY_NAME = {entry.name: entry for entry in TABLE}


def entry(name: str) -> BackendEntry:
    return _BY_NAME[name]


def _load(reference: str) -> type:
    module, name = reference.split(":")
    return getattr(importlib.import_module(f"gvisor_magic.backends.{module}"), name)


def backend_class(name: str) -> type | None:
    """The backend's class; None if its library cannot be imported here."""
    try:
        return _load(_BY_NAME[name].backend)
    except ImportError:
        return None


def transport_class(name: str) -> type | None:
    """The class that keeps a warm sandbox on this backend; None if it has none."""
    reference = _BY_NAME[name].transport
    if reference is None:
        return None
    try:
        return _load(reference)
    except ImportError:
        return None
