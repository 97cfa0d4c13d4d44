"""Interrupting a command from another thread, the way Ctrl-C interrupts it.

The runner's wait loops (``process.stream`` for one-shot sandboxes, ``Channel.receive`` for
warm ones) wake at least every 0.1 s, and every one of them already turns a
``KeyboardInterrupt`` into what Ctrl-C must do: the command's whole tree killed, its partial
output kept, ``CommandInterrupted`` raised with its result, never a second run. A thread
that runs a command for someone else (the asyncio API's worker, ``aio.py``) installs an
``Interrupt`` with ``interruptible``; ``Interrupt.set`` from any thread makes the next
``checkpoint`` in the worker raise one ``KeyboardInterrupt``, exactly once, as one Ctrl-C
would. A thread with no ``Interrupt`` installed (a notebook's, where the real Ctrl-C
arrives) never sees one raised here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_local = threading.local()


class Interrupt:
    """A request to interrupt whatever the thread it is installed in runs."""

    def __init__(self) -> None:
        self._asked = threading.Event()
        self._delivered = False

    def set(self) -> None:
        """Ask for the interrupt (thread-safe; once is enough, more change nothing)."""
        self._asked.set()

    def is_set(self) -> bool:
        return self._asked.is_set()

    def _take(self) -> bool:
        if self._asked.is_set() and not self._delivered:
            self._delivered = True
            return True
        return False


@contextlib.contextmanager
def interruptible(interrupt: Interrupt) -> Iterator[Interrupt]:
    """Install ``interrupt`` in this thread for the block."""
    before = getattr(_local, "interrupt", None)
    _local.interrupt = interrupt
    try:
        yield interrupt
    finally:
        _local.interrupt = before


def checkpoint() -> None:
    """Raise ``KeyboardInterrupt`` if this thread's ``Interrupt`` was set and has not been
    delivered yet; otherwise nothing."""
    interrupt = getattr(_local, "interrupt", None)
    if interrupt is not None and interrupt._take():
        raise KeyboardInterrupt
