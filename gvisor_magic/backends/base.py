"""The protocol every backend implements, and what a probe reports.

A backend knows how to run one validated ``CommandRequest`` and how to say,
by really trying, whether it works here. It never decides about fallbacks:
that happens in one place, ``gvisor_magic.runner``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..process import OutputCallback
from ..request import CommandRequest
from ..result import CommandResult


@dataclass(frozen=True)
class BackendStatus:
    """The outcome of probing one backend on this machine."""

    name: str
    available: bool
    isolated: bool
    #: Why it is (not) usable, in words a user can act on.
    reason: str
    #: What to do about it, when it is not usable.
    fix: str | None = None
    version: str | None = None
    details: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


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
