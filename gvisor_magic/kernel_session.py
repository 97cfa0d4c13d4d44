"""The one warm sandbox a kernel keeps for its cells (created lazily, pre-warmable).

A session's mounts are fixed when it starts, so it is keyed by what fixes them
(working dir, repo, network, mode, isolation requirement, shell): a cell that
needs another key gets a new session and the old one is closed.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from .request import Limits
from .session import IsolatedSession


@dataclass(frozen=True)
class SessionKey:
    workdir: str
    repo: str | None
    network: bool
    mode: str | None
    require_isolation: bool | None
    shell: str
    limits: Limits | None = None
    protected_paths: tuple[str, ...] = ()


_NAMES = {"workdir": "working dir", "repo": "repo", "network": "network", "mode": "mode",
          "require_isolation": "require-isolation", "shell": "shell", "limits": "limits",
          "protected_paths": "protected paths"}


def _differences(old: SessionKey | None, new: SessionKey) -> list[str]:
    if old is None:
        return []
    return [f"other {label}" for name, label in _NAMES.items()
            if getattr(old, name) != getattr(new, name)]


class KernelSessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: SessionKey | None = None
        self._session: IsolatedSession | None = None

    def get(self, key: SessionKey) -> IsolatedSession:
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
                self._session = IsolatedSession(
                    key.workdir, key.repo, mode=key.mode, require_isolation=key.require_isolation,
                    network=key.network, shell=key.shell, limits=key.limits,
                    protected_paths=list(key.protected_paths))
                self._key = key
                if note:
                    self._session.note_for_next_result(note)
            return self._session

    def prewarm(self, key: SessionKey) -> threading.Thread:
        """Start the sandbox in the background, so the first cell does not wait for it."""

        def warm() -> None:
            with contextlib.suppress(Exception):  # the first cell reports it, with the reason
                self.get(key).start()

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
