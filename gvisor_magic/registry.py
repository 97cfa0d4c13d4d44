"""Every backend, in one table.

A row says how a backend runs one command (a ``backends.base.Backend``) and, if it
can, how it keeps a sandbox warm for ``IsolatedSession`` (a ``backends.base.Transport``).
Classes are named here and imported on first use, so this module sits at the bottom
of the package (``request`` takes the mode names from it) and a backend whose
library is missing costs nothing until it is asked for.

Adding a backend: its module under ``backends/`` (a class with ``run``, ``probe`` and
``enforcement``), one row here, and where ``auto``
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


@dataclass(frozen=True)
class Enforcement:
    """What bounds the limits on one backend here, in words a user can check.

    Each backend says this of itself (``enforcement()`` on its class); ``Limits.describe``
    and ``gvisor-magic doctor`` show it, so no text claims more than the backend does.
    """

    #: What bounds ``Limits.memory``, e.g. "host cgroup", or "NOT enforced ...".
    memory: str
    #: What bounds ``Limits.cpus``.
    cpus: str
    #: Every limit on this backend, one paragraph.
    summary: str
    #: Which ``network=`` settings it can enforce, and how.
    network: str = ""


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


def enforcement(names: tuple[str, ...] | None = None) -> dict[str, Enforcement]:
    """What bounds the limits on each named backend (every backend by default), as
    the backend itself says; a backend whose library is missing is left out."""
    table = {}
    for name in names or NAMES:
        cls = backend_class(name)
        if cls is not None:
            table[name] = cls.enforcement()
    return table
