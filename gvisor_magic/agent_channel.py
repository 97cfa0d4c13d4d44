"""The host's side of the session agent's framed channel (see ``session_agent.py``).

Everything that arrives here comes from inside a sandbox and is untrusted: a
frame of an unknown type or over ``MAX_FRAME`` bytes, or a closed channel, is
``SessionBroken``; every read waits at most until a deadline.
"""

from __future__ import annotations

import os
import select
import struct
import time

from .session_agent import FROM_AGENT, MAX_FRAME

__all__ = ["MAX_FRAME", "Channel", "SessionBroken"]


class SessionBroken(Exception):
    """The agent broke the protocol, went silent, or its sandbox died."""


class Channel:
    """Frames to and from the agent, with bounded sizes and bounded waits."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self._buffer = bytearray()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        try:
            self.transport.send(kind + struct.pack(">I", len(payload)) + payload)
        except (OSError, ValueError) as exc:
            raise SessionBroken(f"cannot write to the sandbox agent: {exc}") from exc

    def receive(self, deadline: float | None) -> tuple[bytes, bytes] | None:
        """The next frame, or None when ``deadline`` passes first."""
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            ready, _, _ = select.select([self.transport.stdout_fd], [], [], wait)
            if ready:
                chunk = os.read(self.transport.stdout_fd, MAX_FRAME)
                if not chunk:
                    raise SessionBroken("the sandbox agent closed its channel "
                                        f"({self.transport.stderr_text()[-300:] or 'no message'})")
                self._buffer += chunk
            elif deadline is not None and time.monotonic() >= deadline:
                return None

    def _parse(self) -> tuple[bytes, bytes] | None:
        if len(self._buffer) < 5:
            return None
        kind = bytes(self._buffer[:1])
        size = struct.unpack(">I", self._buffer[1:5])[0]
        if kind not in FROM_AGENT or size > MAX_FRAME:
            raise SessionBroken(f"malformed frame from the sandbox agent (type {kind!r}, "
                                f"{size} bytes)")
        if len(self._buffer) < 5 + size:
            return None
        payload = bytes(self._buffer[5:5 + size])
        del self._buffer[:5 + size]
        return kind, payload
