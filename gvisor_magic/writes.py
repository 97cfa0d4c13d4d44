"""A command's writes, held: taken from the layer its sandbox copied out, judged, applied.

The sandbox's init copied its copy-on-write layer out next to its status file
(``sandboxed/cow_layer.py``). ``take_writes`` moves that copy to a store of its own (it
outlives the sandbox's run dir, until every change is applied or discarded), reads it
as a change set over the working dir (``changes.read_upper``), judges each change with
``activity.classify``, and then, by ``writes``:

- ``"review"``: holds every change;
- ``"auto"``: applies the inert ones at once and holds the active ones (a host tool
  would run or load them without the user naming them);

A held change is data: ``Writes.apply`` and ``Writes.discard`` (and ``CommandResult``'s
``apply``/``discard``) act on it later. When nothing is pending any more the store is
removed; a store still pending when its ``Writes`` is garbage collected, or when the
process exits, is removed then (the held changes are lost, the host never had them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from . import activity
from .changes import (
    DISCARDED,
    ApplyReport,
    Change,
    ChangeSet,
    DiscardReport,
    ListedMarkers,
    apply,
    discard,
    read_upper,
)
from .errors import GvisorMagicError
from .request import SandboxSpec
from .result import CommandResult
from .run_dirs import PREFIX

#: What ``held_reason`` says in review mode.
REVIEW = "writes='review': nothing is applied without review"


class WritesLost(GvisorMagicError):
    """The command's writes could not be taken from its sandbox; none reached the host."""


@dataclass
class WritesSummary:
    """Counts for one line of output: what landed, what waits."""

    applied: int
    held: int
    discarded: int
    conflicts: int

    def describe(self) -> str:
        parts = [f"{self.applied} applied", f"{self.held} held for review"]
        if self.discarded:
            parts.append(f"{self.discarded} discarded")
        if self.conflicts:
            parts.append(f"{self.conflicts} in conflict with host edits")
        return ", ".join(parts)


class Writes:
    """The writes of one command to its working dir (``result.writes``)."""

    def __init__(self, mode: str, changeset: ChangeSet | None, store: str | None, *,
                 lost: str | None = None) -> None:
        self.mode = mode
        self.changeset = changeset
        self.store = store
        #: Why the command's writes never reached the host (killed, timed out...), if so.
        self.lost = lost
        self.conflicts: dict[str, str] = {}
        self._finalizer = (weakref.finalize(self, shutil.rmtree, store, True)
                           if store is not None else None)

    @property
    def changes(self) -> list[Change]:
        return list(self.changeset) if self.changeset is not None else []

    def held(self) -> list[Change]:
        """Changes neither applied nor discarded; not a new directory left pending only
        because something below it is held (applying that applies the directory too)."""
        if self.changeset is None:
            return []
        return [c for c in self.changeset.pending() if c.held_reason or not c.is_dir]

    def summary(self) -> WritesSummary:
        changes = self.changes
        return WritesSummary(sum(1 for c in changes if c.applied), len(self.held()),
                             sum(1 for c in changes if c.applied is False),
                             len(self.conflicts))

    def apply(self, paths: Iterable[str] | None = None) -> ApplyReport:
        """Write the chosen changes into the working dir: ``paths`` (relative to it, a
        directory standing for everything below it), or every pending change, held ones
        included: the caller has reviewed them. A path the host changed since the command
        started is left alone and reported in ``report.conflicts``."""
        if self.changeset is None or not self.changeset.pending():  # the store may be gone
            return ApplyReport()
        if paths is None:
            paths = [c.path for c in self.held()]
        paths = list(paths)
        if not paths:
            return ApplyReport()
        report = apply(self.changeset, paths)
        for path, conflict in report.conflicts.items():
            self.conflicts[path] = conflict.reason
        self._settle()
        return report

    def discard(self, paths: Iterable[str] | None = None) -> DiscardReport:
        """Throw the chosen pending changes away (all by default)."""
        if self.changeset is None or not self.changeset.pending():
            return DiscardReport()
        report = discard(self.changeset, paths)
        self._settle()
        return report

    def close(self) -> None:
        """Remove the store now: pending changes are lost."""
        if self._finalizer is not None:
            self._finalizer()

    def _settle(self) -> None:
        if not self.held():
            self.close()

    def describe(self) -> str:
        """One line: the mode, and what landed and what waits."""
        if self.lost:
            return f"{self.mode}: {self.lost}"
        return f"{self.mode}: {self.summary().describe()}"

    def to_dicts(self) -> list[dict[str, object]]:
        return [{"path": c.path, "kind": c.kind, "is_dir": c.is_dir, "size": c.size,
                 "mode": c.mode, "symlink": c.symlink, "status": c.status,
                 "held_reason": c.held_reason, "diff": c.diff} for c in self.changes]


class HeldChanges:
    """The writes still held of many commands (a session's, a kernel's), oldest first;
    ``apply``/``discard`` take paths relative to the working dir (a directory stands for
    what is below it) and act on every command's pending changes there."""

    def __init__(self) -> None:
        self._writes: list[Writes] = []

    def add(self, writes: Writes) -> None:
        if writes.held():
            self._writes.append(writes)

    def pending(self) -> list[tuple[Writes, Change]]:
        self._writes = [w for w in self._writes if w.held()]
        return [(w, c) for w in self._writes for c in w.held()]

    def apply(self, paths: Iterable[str] | None = None) -> list[str]:
        """Apply ``paths`` (all held when None); lines saying what happened."""
        return self._act("apply", paths)

    def discard(self, paths: Iterable[str] | None = None) -> list[str]:
        return self._act("discard", paths)

    def _act(self, verb: str, paths: Iterable[str] | None) -> list[str]:
        wanted = None if paths is None else [p.strip("/") for p in paths]
        lines: list[str] = []
        found: set[str] = set()
        for writes in list(self._writes):
            mine = [c.path for c in writes.held()]
            if wanted is not None:
                mine = [p for p in mine if any(p == w or p.startswith(w + "/") for w in wanted)]
                found.update(w for w in wanted for p in mine if p == w or p.startswith(w + "/"))
            if not mine:
                continue
            if verb == "apply":
                report = writes.apply(mine)
                lines += [f"applied {p}" for p in report.applied]
                lines += [f"NOT applied {p}: {e.reason}" for p, e in report.conflicts.items()]
            else:
                report = writes.discard(mine)
                lines += [f"discarded {p}" for p in report.discarded]
        for missing in sorted(set(wanted or ()) - found):
            lines.append(f"{missing}: no held change there")
        self.pending()
        return lines



    def changes(self) -> list[Change]:
        """Every change still held, oldest command first."""
        return [c for _, c in self.pending()]


def _store_base(status_dir: str) -> str:
    return os.path.dirname(os.path.dirname(status_dir)) or tempfile.gettempdir()


def take_writes(mode: str, working_dir: str, status_dir: str, *, started_ns: int,
                completed: bool, host: activity.HostContext | None = None,
                store_base: str | None = None) -> Writes:
    """The writes the sandbox copied out to ``status_dir`` (see the top of this module).

    ``completed``: the command ended on its own (not killed, timed out or out of memory):
    otherwise nothing is applied, whatever the layer says. ``store_base``: where the held
    files are kept (by default beside the run dir whose status dir this is).
    """
    out = os.path.join(status_dir, "upper")
    try:
        with open(os.path.join(status_dir, "done"), "rb") as handle:
            done = handle.read(64)
    except FileNotFoundError:
        return Writes(mode, None, None, lost="the sandbox ended before its writes were copied "
                      "out: none reached the working dir")
    os.unlink(os.path.join(status_dir, "done"))  # a warm sandbox's next copy starts clean
    if done == b"empty":
        return Writes(mode, None, None)  # the command wrote nothing
    # Named as a run dir (its maker's pid): removed by the next run if this process dies.
    store = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-writes-",
                             dir=store_base or _store_base(status_dir))
    try:
        os.rename(out, os.path.join(store, "upper"))
        with open(os.path.join(status_dir, "markers.json"), "rb") as handle:
            listed = json.loads(handle.read(16 << 20))
        markers = ListedMarkers(_names(listed.get("deleted")), _names(listed.get("opaque")))
        changeset = read_upper(os.path.join(store, "upper"), working_dir, markers=markers,
                               started_ns=started_ns)
        changeset.movable = True  # the store is this process's own: apply moves from it
        for name in _names(listed.get("skipped")):
            changeset.skipped[name] = "not a file, directory or symlink: never applied"
    except BaseException:
        shutil.rmtree(store, ignore_errors=True)
        raise
    writes = Writes(mode, changeset, store)
    if not completed:
        writes.discard()
        writes.lost = "the command did not end on its own: its writes were discarded"
        return writes
    judge(changeset, working_dir, mode, host)
    if mode == "auto":
        inert = _inert_paths(changeset)
        if inert:
            writes.apply(inert)
    writes._settle()
    return writes


def take_held_writes(spec: SandboxSpec, status_dir: str, started_ns: int, *,
                     completed: bool, store_base: str | None = None) -> Writes:
    """``take_writes`` for a backend: a layer that cannot be read is reported on the result
    (its writes lost, none applied), never raised: the command has run."""
    assert spec.working_dir is not None
    try:
        return take_writes(spec.writes_mode, spec.working_dir, status_dir, started_ns=started_ns,
                           completed=completed, store_base=store_base)
    except (OSError, ValueError, GvisorMagicError) as exc:
        return Writes(spec.writes_mode, None, None,
                      lost=f"the command's writes could not be read from its sandbox ({exc}): "
                      "none reached the working dir")


def with_writes(result: CommandResult, writes: Writes | None) -> CommandResult:
    """``result`` carrying ``writes``, with a one-line account in its details."""
    if writes is None:
        return result
    result.details["writes"] = writes.describe()
    return dataclasses.replace(result, writes=writes)


def _inert_paths(changeset: ChangeSet) -> list[str]:
    """The changes ``auto`` applies: every change not held, but a directory only when
    nothing below it is held (applying a directory applies what it holds)."""
    held = [c.path + "/" for c in changeset if c.held_reason is not None]
    return [c.path for c in changeset if c.held_reason is None
            and not (c.is_dir and any(h.startswith(c.path + "/") for h in held))]


def _names(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str)]


def judge(changeset: ChangeSet, working_dir: str, mode: str,
          host: activity.HostContext | None = None) -> None:
    """Hold what ``mode`` holds: everything in review, the active changes in auto."""
    host = host or activity.HostContext.current()
    real = os.path.realpath(working_dir)
    with activity.batch():
        for c in changeset:
            if c.held_reason is not None or c.applied is not None:
                continue
            reason = _active_reason(changeset, c, working_dir, real, host)
            if reason is not None:
                changeset.hold(c.path, reason)
            elif mode == "review":
                changeset.hold(c.path, REVIEW)
    for path, why in changeset.changed_during.items():
        if path in changeset and changeset[path].held_reason is None:
            changeset.hold(path, why)


def _active_reason(cs: ChangeSet, c: Change, working_dir: str, real: str,
                   host: activity.HostContext) -> str | None:
    if c.is_dir and c.kind != "deleted":
        return None  # a directory runs nothing; what it holds is judged one by one
    verdict = activity.classify(
        c.path, working_dir=working_dir,
        content=functools.partial(cs.content, c.path, activity.MAX_CONFIG_BYTES),
        mode=c.mode, is_symlink=c.is_symlink, link_target=c.symlink,
        deleted=c.kind == "deleted", host=host,
        exists=lambda p: _exists_after(cs, real, p))
    return f"{verdict.klass}: {verdict.reason}" if verdict.active else None


def _exists_after(cs: ChangeSet, real: str, path: str) -> bool:
    rel = os.path.relpath(path, real)
    if rel.startswith(".."):
        return os.path.lexists(path)
    return cs.exists_after(rel)


__all__ = ["DISCARDED", "REVIEW", "HeldChanges", "Writes", "WritesLost", "WritesSummary", "judge",
           "take_held_writes", "take_writes", "with_writes"]
