"""The result of one command, identical in shape for every backend."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .egress.policy import Blocked, NetworkPolicy

if TYPE_CHECKING:
    from .changes import ApplyReport, Change, DiscardReport
    from .process import Capture
    from .writes import Writes

#: Exit status reported when a command hit its timeout (as GNU ``timeout`` does).
TIMEOUT_RETURNCODE = 124
#: Exit status when the sandbox itself failed (as ``docker run`` reports its own errors).
RUNTIME_FAILURE = 125
#: What an interrupted or vanished command reports: it was killed (SIGKILL).
KILLED = -9


def returncode_of(raw: int | None, *, init_status: str = "", timed_out: bool = False,
                  interrupted: bool = False, failed: bool = False) -> int:
    """The one exit-status rule, for every backend and for warm sessions.

    ``raw``: the status the runtime reported (``Popen`` style: ``-N`` for a signal), or
    None if there is none. ``init_status``: what the sandbox's init (or a session's
    agent) saw, ``"exit N"`` or ``"signal N"``, "" when it reported nothing; it comes
    from inside the sandbox, so it only ever turns an ambiguous ``128 + N`` into ``-N``.

    In order: the sandbox failed -> 125; the timeout fired -> 124; interrupted and the
    command did not end on its own with a signal or a nonzero status -> -9; ``128 + N``
    while the init saw signal N -> ``-N``; no status at all -> -9; else ``raw``.
    """
    if failed:
        return RUNTIME_FAILURE
    if timed_out:
        return TIMEOUT_RETURNCODE
    if interrupted and (not init_status or raw == 0):
        return KILLED
    if init_status.startswith("signal ") and raw == 128 + int(init_status.split()[1]):
        return -int(init_status.split()[1])
    return KILLED if raw is None else raw


def network_fields(policy: NetworkPolicy) -> dict[str, object]:
    """A result's ``network`` and ``network_policy``, from its sandbox's policy."""
    return {"network": policy.enabled, "network_policy": policy.describe()}


@dataclass(frozen=True)
class CommandResult:
    """What happened when a command ran.

    ``backend`` and ``isolated`` say where it ran; ``fallback_reason`` says why
    a better backend was not used. A result never claims isolation it did not
    have: ``isolated`` is True only when the command ran under gVisor.
    """

    returncode: int
    stdout: str
    stderr: str
    backend: str
    isolated: bool
    timed_out: bool = False
    duration: float = 0.0
    fallback_reason: str | None = None
    truncated: bool = False
    #: Whether the command could reach any network (see ``network_policy`` for which).
    network: bool = False
    #: The sandbox's network, in words: "off", "allowlist: pypi, example.com:8443"...
    network_policy: str = "off"
    #: Destinations the command tried and was refused (host, port, reason, how to allow).
    blocked: tuple[Blocked, ...] = ()
    #: Set when the sandbox itself failed under the command (crashed, lost its
    #: daemon); the command may have partly run and was not retried.
    error: str | None = None
    #: Free-form details from the backend (sandbox id, runsc version, ...).
    details: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The command's writes to the working dir when they were held in a copy-on-write
    #: layer (``writes`` "review" or "auto"); None when they landed as made.
    writes: Writes | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def changes(self) -> list[Change]:
        """What the command added, modified and deleted in the working dir, each applied,
        held (and why) or discarded; empty when its writes were not held."""
        return self.writes.changes if self.writes is not None else []

    @property
    def held(self) -> list[Change]:
        """The changes still waiting for ``apply`` or ``discard``."""
        return self.writes.held() if self.writes is not None else []

    def apply(self, paths: Iterable[str] | None = None) -> ApplyReport:
        """Apply held changes to the working dir: ``paths`` or all of them (see
        ``gvisor_magic.writes.Writes.apply``)."""
        if self.writes is None:
            raise ValueError("this command's writes were not held (writes='direct', or a "
                             "backend that cannot hold them): there is nothing to apply")
        return self.writes.apply(paths)

    def discard(self, paths: Iterable[str] | None = None) -> DiscardReport:
        """Throw held changes away: ``paths`` or all of them."""
        if self.writes is None:
            raise ValueError("this command's writes were not held: there is nothing to "
                             "discard")
        return self.writes.discard(paths)

    @classmethod
    def from_streams(cls, stdout: Capture, stderr: Capture, *, returncode: int, backend: str,
                     isolated: bool, network: NetworkPolicy, timed_out: bool = False,
                     duration: float = 0.0, error: str | None = None,
                     details: dict[str, str] | None = None,
                     blocked: Iterable[Blocked] = ()) -> CommandResult:
        """The one way a backend or a session turns what it captured into a result."""
        return cls(returncode=returncode, stdout=stdout.text(), stderr=stderr.text(),
                   backend=backend, isolated=isolated, timed_out=timed_out,
                   duration=duration, truncated=stdout.truncated or stderr.truncated,
                   **network_fields(network), blocked=tuple(blocked), error=error,
                   details=dict(details or {}))

    @property
    def success(self) -> bool:
        """True when the command exited with status 0 and did not time out."""
        return self.returncode == 0 and not self.timed_out

    @property
    def signal_name(self) -> str | None:
        """Name of the signal that killed the command, if one did."""
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def describe(self) -> str:
        """One line saying where the command ran and how it ended."""
        where = f"{self.backend} ({'gVisor' if self.isolated else 'NOT isolated'})"
        if self.timed_out:
            end = "timed out"
        elif self.returncode < 0:
            end = f"killed by {self.signal_name}"
        else:
            end = f"exit {self.returncode}"
        text = f"{where}: {end} in {self.duration:.2f}s"
        if self.network:
            text += f", network: {self.network_policy}"
        if self.truncated:
            text += ", output truncated"
        if self.error:
            text += f"; sandbox error: {self.error}"
        if self.fallback_reason:
            text += f"; fallback: {self.fallback_reason}"
        return text

    def warnings(self, *, held: bool = True) -> list[str]:
        """Sentences about what needs the user's attention beyond the exit status
        (``held=False``: not the changes held for review, for a face that shows them)."""
        notes = []
        if self.blocked:
            notes.append("network: the command tried to reach what this sandbox may not "
                         f"(network {self.network_policy}):\n  - "
                         + "\n  - ".join(item.describe() for item in self.blocked))
        quarantined = self.details.get("quarantined")
        if quarantined:
            notes.append("the command left files that a host tool would run later; they were "
                         "moved to quarantine (nothing was deleted):\n  - "
                         + quarantined.replace("; ", "\n  - "))
        if self.details.get("stripped_setid"):
            notes.append("set-ID bits the command gave files were removed: "
                         + self.details["stripped_setid"])
        if self.details.get("relaxed_protection"):
            notes.append("protection relaxed on request for: "
                         + self.details["relaxed_protection"])
        if self.details.get("protection_note"):
            notes.append(self.details["protection_note"])
        if self.details.get("session_note"):
            notes.append(self.details["session_note"])
        if self.writes is not None and self.writes.lost:
            notes.append(f"writes: {self.writes.lost}")
        pending = self.held if held else []
        if pending:
            notes.append(f"{len(pending)} change(s) to the working dir held for review (nothing "
                         "of them is on the host; result.apply() or result.discard()):\n  - "
                         + "\n  - ".join(f"{c.kind} {c.path}: {c.held_reason}"
                                          for c in pending[:20])
                         + (f"\n  - ... and {len(pending) - 20} more"
                            if len(pending) > 20 else ""))
        return notes

    def check_returncode(self) -> None:
        """Raise ``subprocess.CalledProcessError`` if the command failed."""
        import subprocess

        if not self.success:
            raise subprocess.CalledProcessError(
                self.returncode, "isolated command", self.stdout, self.stderr
            )

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable form (used by ``gvisor-magic run --json``)."""
        data = dataclasses.asdict(dataclasses.replace(self, writes=None))
        del data["writes"]
        data["success"] = self.success
        if self.writes is not None:
            data["changes"] = self.writes.to_dicts()
        return data
