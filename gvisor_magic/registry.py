"""Every backend, in one table.

A row says how a backend runs one command (a ``backends.base.Backend``) and, if it
can, how it keeps a sandbox warm for ``IsolatedSession`` (a ``backends.base.Transport``).
Classes are named here and imported on first use, so this module sits at the bottom
of the package (``request`` takes the mode names from it) and a backend whose
library is missing costs nothing until it is asked for.

This is the only place that names backends: detection, the order ``auto`` tries them
in, what counts as isolated, the modes users may ask for, ``doctor`` and the status
widget all read the table. Adding a backend: its module under ``backends/`` (a class
with ``name``, ``isolated``, ``run``, ``probe`` and ``enforcement``) and one row here.
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
    #: Whether it runs commands in a gVisor sandbox. A row that does not is a fallback:
    #: its results say "NOT isolated", and ``require_isolation`` leaves it out.
    isolates: bool = True
    #: Where ``auto`` tries it, by where this process runs (see ``PLACES``): lower first;
    #: a place it is missing from never uses it on its own (``mode=`` still can).
    rank: tuple[tuple[str, int], ...] = ()
    #: It can host the "Python 3 (gVisor)" kernel: the kernel's ZMQ sockets are Unix
    #: sockets the sandbox creates and the host connects to (``runsc --host-uds=create``).
    kernel: bool = False

    def rank_in(self, place: str) -> int | None:
        return dict(self.rank).get(place)


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


#: Where this process runs, as ``auto`` tells places apart, and why it orders them so.
PLACES = {
    "host": "Linux host: Docker with the runsc runtime when configured, else runsc directly",
    "container": "inside a container/pod: runsc directly, for isolation within the container",
    "other": "gVisor runs only on Linux",
}

TABLE = (
    BackendEntry("runsc", "runsc:RunscBackend", "transports:RunscTransport",
                 rank=(("container", 1), ("host", 2)), kernel=True),
    BackendEntry("docker", "docker:DockerBackend", "transports:DockerTransport",
                 requires="docker", rank=(("host", 1), ("container", 2))),
    BackendEntry("subprocess", "subprocess:SubprocessBackend", isolates=False,
                 rank=(("host", 9), ("container", 9), ("other", 9))),
)
#: The names of ``TABLE`` when the package was imported (``names()`` reads it afresh).
NAMES = tuple(row.name for row in TABLE)


def names() -> tuple[str, ...]:
    """Every backend's name, in the table's order."""
    return tuple(row.name for row in TABLE)


def entry(name: str) -> BackendEntry:
    """The row of ``name``; ``KeyError`` for a name no row has (validate modes first:
    ``request.resolve_mode``)."""
    for row in TABLE:
        if row.name == name:
            return row
    raise KeyError(name)


def isolates(name: str) -> bool:
    return entry(name).isolates


def kernel_backend() -> str | None:
    """The backend that hosts the gVisor kernel (the first row that can), or None."""
    return next((row.name for row in TABLE if row.kernel), None)


def auto_order(place: str) -> tuple[str, ...]:
    """The backends ``auto`` tries in ``place`` (a key of ``PLACES``), first choice first."""
    ranked = [(row.rank_in(place), index, row.name) for index, row in enumerate(TABLE)]
    return tuple(name for rank, _, name in sorted(r for r in ranked if r[0] is not None))


def _load(reference: str) -> type:
    """``module:Class`` under ``gvisor_magic.backends``, or ``package.module:Class``."""
    module, name = reference.split(":")
    if "." not in module:
        module = f"gvisor_magic.backends.{module}"
    return getattr(importlib.import_module(module), name)


def backend_class(name: str) -> type | None:
    """The backend's class; None if its library cannot be imported here."""
    try:
        return _load(entry(name).backend)
    except ImportError:
        return None


def transport_class(name: str) -> type | None:
    """The class that keeps a warm sandbox on this backend; None if it has none."""
    reference = entry(name).transport
    if reference is None:
        return None
    try:
        return _load(reference)
    except ImportError:
        return None


def enforcement(which: tuple[str, ...] | None = None) -> dict[str, Enforcement]:
    """What bounds the limits on each named backend (every backend by default), as
    the backend itself says; a backend whose library is missing is left out."""
    table = {}
    for name in which or names():
        cls = backend_class(name)
        if cls is not None:
            table[name] = cls.enforcement()
    return table
