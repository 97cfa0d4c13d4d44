"""The protocol every backend implements (what a probe reports is ``detect.BackendStatus``).

A backend knows how to run one validated ``CommandRequest`` and how to say,
by really trying, whether it works here. It never decides about fallbacks:
that happens in one place, ``gvisor_magic.runner``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..detect import BackendStatus
from ..process import OutputCallback
from ..request import CommandRequest
from ..result import CommandResult

__all__ = ["Backend", "BackendStatus"]


@runtime_checkable
class Backend(Protocol):
    """A way of running commands: ``runsc``, ``docker`` or ``subprocess``."""

    name: str
    isolated: bool

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
