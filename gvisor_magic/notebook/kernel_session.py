"""The one warm sandbox a kernel keeps for its cells (created lazily, pre-warmable).

A session's mounts are fixed when it starts, so it serves one ``SandboxSpec`` (and one
choice of backend: mode, isolation requirement): a cell that needs another gets a new
session, the old one is closed, and the cell is told that its ``/tmp`` and ``HOME`` are new.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

from ..request import SandboxSpec
from ..session import IsolatedSession

#: How a cell's note names a field of ``SandboxSpec`` (any other: its name, in words).
_LABELS = {"repo_path": "repo", "protection": "protected paths"}

#: What a kernel's warm sandbox is for: its spec, and how its backend is chosen.
WarmKey = tuple[SandboxSpec, "str | None", "bool | None"]


def _differences(old: WarmKey | None, new: WarmKey) -> list[str]:
    if old is None:
        return []
    (old_spec, old_mode, old_require), (spec, mode, require) = old, new
    found = [f"other {_LABELS.get(field.name, field.name.replace('_', ' '))}"
             for field in dataclasses.fields(SandboxSpec)
             if field.compare and getattr(old_spec, field.name) != getattr(spec, field.name)]
    found += ["other mode"] * (old_mode != mode) + ["other require-isolation"] * (
        old_require != require)
    return found


class KernelSessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: WarmKey | None = None
        self._session: IsolatedSession | None = None

    def get(self, spec: SandboxSpec, mode: str | None = None,
            require_isolation: bool | None = None) -> IsolatedSession:
        key = (spec, mode, require_isolation)
        with self._lock:
            note = None
            if self._session is not None and (self._key != key or self._session.closed):
                if self._key != key and self._session.state == "warm":
                    note = ("this cell needs another sandbox than the previous cell ("
                            + ", ".join(_differences(self._key, key)) + "): files the "
                            "previous one kept in /tmp and HOME are not in this one")
                self._session.close()
                self._session = None
            if self._session is None:
                self._session = IsolatedSession(spec, mode=mode,
                                                require_isolation=require_isolation)
                self._key = key
                if note:
                    self._session.note_for_next_result(note)
            return self._session

    def prewarm(self, spec: SandboxSpec, mode: str | None = None,
                require_isolation: bool | None = None) -> threading.Thread:
        """Start the sandbox in the background, so the first cell does not wait for it."""

        def warm() -> None:
            with contextlib.suppress(Exception):  # the first cell reports it, with the reason
                self.get(spec, mode, require_isolation).start()

        thread = threading.Thread(target=warm, daemon=True, name="gvisor-magic-prewarm")
        thread.start()
        return thread

    def restart(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.restart()

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def describe(self) -> str:
        session = self._session
        if session is None:
            return "stopped"
        if session.state == "warm":
            return f"warm ({session.backend})"
        if session.state == "one-shot":
            return f"one-shot ({session.cold_reason})"
        return session.state
