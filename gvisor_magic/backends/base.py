"""The protocol every backend implements (what a probe reports is ``detect.BackendStatus``).

A backend knows how to run one validated ``CommandRequest`` and how to say,
by really trying, whether it works here. It never decides about fallbacks:
that happens in one place, ``gvisor_magic.runner``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..detect import BackendStatus
from ..egress.sandbox import SandboxNetwork
from ..process import OutputCallback
from ..registry import Enforcement
from ..request import CommandRequest, SandboxSpec
from ..result import CommandResult

__all__ = ["Backend", "BackendStatus", "Transport"]


@runtime_checkable
class Backend(Protocol):
    """A way of running commands: ``runsc``, ``docker`` or ``subprocess``."""

    name: str
    isolated: bool

    @staticmethod
    def enforcement() -> Enforcement:
        """What bounds each limit on this backend here (shown, never more than holds)."""
        ...

    def probe(self) -> BackendStatus:
        """Check, by running something real, whether this backend works here."""
        ...

    def run(self, request: CommandRequest, on_output: OutputCallback | None = None
            ) -> CommandResult:
        """Run the command once.

        Raises ``SandboxStartError`` only when the command provably did not
        start; any failure after that is reported in the returned result.
        """
        ...


@runtime_checkable
class Transport(Protocol):
    """A long-lived sandbox whose PID 1 is the session agent (``sandboxed/session_agent.py``):
    a byte channel to it, and explicit teardown. ``IsolatedSession`` speaks the agent's
    protocol over it; the backend's row in ``gvisor_magic.registry`` names the class."""

    name: str
    #: The sandbox's (or container's) id, as results report it.
    sandbox_id: str
    #: Readable end of the channel (agent -> host).
    stdout_fd: int
    #: The sandbox's base environment (``HOME``, ``PATH``, ``USER``...).
    env: dict[str, str]
    #: Its network: the proxy's record, what was refused (``egress.sandbox``).
    network: SandboxNetwork

    def __init__(self, spec: SandboxSpec) -> None:
        """Start a sandbox made to ``spec``; raise ``SandboxStartError`` if it cannot."""

    def send(self, data: bytes) -> None:
        """Write to the channel (host -> agent)."""

    def alive(self) -> bool: ...

    def stderr_text(self) -> str:
        """The sandbox's own last messages, for errors."""

    def memory_events(self) -> int:
        """How often ``Limits.memory`` ended something in this sandbox so far."""

    def memory_note(self) -> str:
        """What a memory event means on this backend, for the result."""

    def close(self) -> None:
        """Kill the sandbox and remove all it left; idempotent."""
