"""Exceptions raised by the runner core.

They are kept apart from the backends so that callers (the CLI, the IPython
extension) can catch them without importing any backend.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import CommandResult


class GvisorMagicError(Exception):
    """Base class for every error this package raises on purpose."""


class InvalidRequestError(GvisorMagicError, ValueError):
    """The command or one of its options is invalid; nothing was run.

    A subclass of ``ValueError`` so that ordinary input checks keep working.
    """


class IsolationUnavailable(GvisorMagicError, RuntimeError):
    """No gVisor backend could run the command and falling back was not allowed.

    ``reasons`` maps each backend that was tried or considered to the reason it
    could not be used, so the message tells the user what to fix.
    """

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        self.reasons: dict[str, str] = dict(reasons or {})
        if self.reasons:
            details = "\n".join(f"  - {name}: {why}" for name, why in self.reasons.items())
            message = f"{message}\n{details}"
        super().__init__(message)


class SandboxStartError(GvisorMagicError):
    """The sandbox could not be started, and the command provably did not run.

    Only this error allows the runner to fall back to another backend: a
    failure after the command started is reported in the result, never retried,
    because running a command twice (``npm install``, a migration, a payment
    script) can be worse than not running it at all.
    """

    def __init__(self, backend: str, reason: str, fix: str | None = None, *,
                 unsupported: bool = False) -> None:
        self.backend = backend
        self.reason = reason
        #: What the user can do about it, when the backend knows.
        self.fix = fix
        #: The backend cannot do what was asked (``network=True`` on Docker's runtime):
        #: nothing was tried, so another backend may be, whatever gVisor's state here.
        self.unsupported = unsupported
        super().__init__(f"{backend}: {reason}")


class CommandCancelled(asyncio.CancelledError):
    """The task awaiting a command (``gvisor_magic.aio``) was cancelled: the command was
    interrupted as by Ctrl-C, its whole process tree killed before this was raised.

    It is an ``asyncio.CancelledError``, so the task ends cancelled as asyncio expects;
    ``result`` keeps the partial output (None if the command never started)."""

    def __init__(self, result: CommandResult | None,
                 message: str = "command cancelled; its processes were killed") -> None:
        self.result = result
        super().__init__(message)


class CommandInterrupted(KeyboardInterrupt):
    """The caller interrupted a running command (Ctrl-C, the kernel's stop button).

    The command's whole process tree and its sandbox were killed before this was
    raised. It is a ``KeyboardInterrupt`` so that it stops a notebook cell or a
    script as an interrupt normally does; ``result`` keeps the partial output.
    """

    def __init__(self, result: CommandResult,
                 message: str = "command interrupted; its sandbox was killed") -> None:
        self.result = result
        super().__init__(message)
