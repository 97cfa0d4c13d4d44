"""A command's writes, held in a copy-on-write layer, read out, applied or discarded.

The command runs over an overlay: its lower layer is the user's real working dir, its
upper layer (``upper``) receives every write. After the command, ``read_upper`` turns
the upper into a ``ChangeSet``; the classifier (``activity.py``) marks what must be
reviewed (``held_reason``); ``apply`` writes the rest into the working dir and
``discard`` throws changes away.

The upper follows overlayfs conventions: a deleted entry is a character device 0/0 (a
whiteout); a directory deleted and re-created is *opaque* (``trusted.overlay.opaque=y``,
or ``user.overlay.opaque=y`` in userxattr mode) and hides everything below it in the
lower; a copied-up file is the whole new file. How whiteouts and opaque directories are
recognised is pluggable (``Markers``): ``OverlayMarkers`` reads the overlay's own
markers, ``ListedMarkers`` also takes them from a list, for an upper copied out of the
sandbox to a filesystem without xattrs or devices.

What the host does with a change set is guarded, because the upper is written by the
untrusted command and the working dir may change while the command runs:

- **No symlink is followed** on the host side. Every path is reached component by
  component with ``O_NOFOLLOW`` and ``dir_fd`` (``_Tree``); a directory of the working
  dir that became a symlink (to anywhere) stops everything below it (``UnsafePath``).
  A symlink in the change set is written as a symlink; one whose target leaves the
  working dir is still only a link, and the report says so.
- **Set-ID bits are removed** (``S_ISUID``, ``S_ISGID``); other mode bits are kept.
  Files are created by the host process, so they belong to the host user.
- **Each file appears whole or not at all**: it is written to a temporary name in its
  target directory and renamed into place; a failed write removes the temporary file
  and leaves the old one as it was. Data is not fsynced unless ``fsync=True`` (file and
  directory): after a power loss, not a process crash, a file renamed into place may be
  empty (ext4's ``auto_da_alloc`` flushes one renamed over an existing file, not a new
  one). Between the last check of a path and its rename the host can still write it:
  the window is a few system calls, ``rename`` has no compare-and-swap.
- **The working dir itself is trusted**: its path is opened as given; everything below
  it is not.
- **Conflicts hold one path, not the call.** ``apply`` is atomic per path, not per
  call: a path whose host entry changed since the command started (``snapshot_lower``,
  ``started_ns``) or since the read-out is left alone and reported as a
  ``ChangeConflict``; the other selected paths are applied. A rename per file cannot
  make many files appear at once anyway, and holding everything because of one edited
  file would make the user review what needed no review.
- **A directory is deleted only if it is empty** once the change set's own deletions
  below it are done: a file the host added there, or a deletion that conflicted, keeps
  it (and the report says why).
- **Applying twice is harmless**: applied changes are skipped; one applied by another
  route meanwhile shows up as a conflict, so nothing is overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import json
import os
import posixpath
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from .errors import GvisorMagicError

#: Diffs are made only for text files up to this size on each side.
DIFF_LIMIT = 64 * 1024
#: Kept for callers that compare ``time.time_ns()`` with ctimes themselves; ``start_stamp``
#: needs none.
CLOCK_SLACK_NS = 0


def start_stamp() -> int:
    """The ``started_ns`` to take just before a command starts.

    The kernel stamps ctimes from its coarse clock (one tick, 4 ms at 250 Hz, behind the
    precise one), so this reads the same clock: a host change in any later tick has a
    ctime after it, and a change made before the start never has. A change made in the
    very tick the command started in is not told apart from one just before it: it counts
    as before (the precise clock would instead flag every write made a few milliseconds
    before the start, such as a script's own input written just before it runs the
    command)."""
    coarse = getattr(time, "CLOCK_REALTIME_COARSE", None)
    return time.clock_gettime_ns(coarse) if coarse is not None else time.time_ns()
#: What ``held_reason`` says of a discarded change.
DISCARDED = "discarded"

Kind = Literal["added", "modified", "deleted"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID
_CHUNK = 1 << 20


class ChangeError(GvisorMagicError):
    """A change could not be read, applied or discarded; ``path`` says which."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path or '.'}: {reason}")


class ChangeConflict(ChangeError):
    """The host entry changed after the command started; nothing was written there."""


class UnsafePath(ChangeError):
    """Reaching the path on the host would go through a symlink or a non-directory."""


class UpperLayoutError(GvisorMagicError):
    """The upper layer uses an overlay feature this module cannot read safely."""


# --- what the lower looked like ---------------------------------------------------------


class LowerState(NamedTuple):
    """One host entry's identity and content stamp, as ``lstat`` saw it."""

    dev: int
    ino: int
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> LowerState:
        return cls(st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def same_as(self, other: LowerState | None) -> bool:
        """Whether ``other`` is this entry, unchanged.

        A directory's times and size change with its entries, which the change set checks
        one by one: a directory is the same if it is the same inode with the same mode.
        """
        if other is None:
            return False
        if self.is_dir:
            return (self.dev, self.ino, self.mode) == (other.dev, other.ino, other.mode)
        return self == other


def snapshot_lower(lower: str | os.PathLike[str],
                   paths: Iterable[str]) -> dict[str, LowerState | None]:
    """The state of ``paths`` (relative to ``lower``) now, None for a missing one.

    Taken before the command, and given to ``read_upper(baseline=...)``, it tells a host
    edit made while the command ran from the command's own. When the paths are not known
    in advance, ``read_upper(started_ns=...)`` is the cheap equivalent.
    """
    tree = _Tree(lower)
    try:
        return {rel: _state(tree.lstat(_parts(rel))) for rel in paths}
    finally:
        tree.close()


def _lstat_in(root: str, parts: tuple[str, ...]) -> os.stat_result | None:
    tree = _Tree(root)
    try:
        return tree.lstat(parts)
    finally:
        tree.close()


def _state(st: os.stat_result | None) -> LowerState | None:
    return None if st is None else LowerState.of(st)


# --- changes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One path the command added, modified or deleted, relative to the working dir.

    ``size``, ``mode`` and ``symlink`` describe the new entry (the old one for a deletion);
    ``mode`` is the full ``st_mode``, set-ID bits included: they are removed when applied.
    ``diff`` is a unified diff for a text file (UTF-8, at most ``DIFF_LIMIT`` bytes on
    each side) that was added or modified, None otherwise. ``applied`` is None until the
    change is applied (True) or discarded (False); ``held_reason`` says why the
    classifier held it for review, or ``DISCARDED``.
    """

    path: str
    kind: Kind
    is_dir: bool
    size: int
    mode: int
    symlink: str | None = None
    diff: str | None = None
    applied: bool | None = None
    held_reason: str | None = None

    @property
    def is_symlink(self) -> bool:
        return self.symlink is not None

    @property
    def link_leaves_workdir(self) -> bool:
        """A symlink whose target is absolute or climbs out of the working dir (by name)."""
        return self.symlink is not None and _leaves(self.path, self.symlink)

    @property
    def status(self) -> str:
        """``pending``, ``held``, ``applied`` or ``discarded``."""
        if self.applied:
            return "applied"
        if self.applied is False:
            return "discarded"
        return "held" if self.held_reason else "pending"


def _leaves(path: str, target: str) -> bool:
    if target.startswith("/"):
        return True
    where = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return where == ".." or where.startswith("../")


@dataclass
class ChangeSet:
    """The changes of one command, parents before children.

    ``lower_state`` is each changed path's host entry at read-out (None: missing), the
    state ``apply`` requires before writing there; ``changed_during`` names the paths
    the host changed while the command ran (a conflict whatever happens next);
    ``skipped`` names what the upper held that is never applied (devices, fifos,
    sockets). Only the ``applied``/``held_reason`` of its changes change after read-out.
    """

    lower: str
    upper: str
    changes: dict[str, Change]
    lower_state: dict[str, LowerState | None]
    changed_during: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    started_ns: int | None = None
    markers: Markers | None = field(default=None, repr=False)
    #: How each deletion is written in the upper: "whiteout", "listed" or "hidden"
    #: (below an opaque directory, or a directory replaced by a file).
    deletion_origin: dict[str, str] = field(default_factory=dict, repr=False)
    #: The upper's opaque directories (the lower below them is hidden).
    opaque: set[str] = field(default_factory=set, repr=False)
    #: The upper is a private copy nothing else uses (a store the host made from a layer
    #: copied out of a sandbox that has ended): ``apply`` may move its files into place
    #: (a rename on the same filesystem) instead of copying them.
    movable: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes.values())

    def __len__(self) -> int:
        return len(self.changes)

    def __getitem__(self, path: str) -> Change:
        return self.changes[path]

    def __contains__(self, path: object) -> bool:
        return path in self.changes

    def pending(self) -> list[Change]:
        """Neither applied nor discarded (held ones included)."""
        return [c for c in self if c.applied is None]

    def content(self, path: str, limit: int = 1 << 20) -> bytes | None:
        """The new bytes of changed regular file ``path``, read from the upper.

        None for a deletion, a directory, a symlink, or a file larger than ``limit``: what
        the classifier's ``content`` expects (``functools.partial(cs.content, path)``).
        """
        c = self.changes.get(path)
        if c is None or c.kind == "deleted" or c.is_dir or c.symlink is not None \
                or c.size > limit:
            return None
        parts = _parts(path)
        tree = _Tree(self.upper)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=tree.dir(parts[:-1]))
        except (OSError, UnsafePath):
            return None
        finally:
            tree.close()
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None

    def exists_after(self, path: str) -> bool:
        """Whether ``path`` (absolute, or relative to the working dir) exists once the
        change set is applied: the classifier's ``exists``. Paths outside the working dir
        are asked of the host."""
        if os.path.isabs(path):
            rel = os.path.relpath(path, os.path.realpath(self.lower))
            if rel == ".." or rel.startswith("../"):
                return os.path.lexists(path)
        else:
            rel = path
        rel = _normalize(rel)
        if rel in self.changes:
            return self.changes[rel].kind != "deleted"
        parts = _parts(rel)
        for i in range(len(parts) - 1, 0, -1):
            above = "/".join(parts[:i])
            c = self.changes.get(above)
            if c is not None and c.kind == "deleted":
                return False
            then = self.lower_state.get(above)
            if above in self.opaque or (c is not None and not (
                    c.is_dir and then is not None and then.is_dir)):
                return self._in_upper(parts)  # added, replaced or opaque: no lower below
        if "" in self.opaque:
            return self._in_upper(parts)
        return self._in_upper(parts) or _lstat_in(self.lower, parts) is not None

    def _in_upper(self, parts: tuple[str, ...]) -> bool:
        st = _lstat_in(self.upper, parts)
        if st is None:
            return False
        markers = self.markers or OverlayMarkers()
        return not markers.is_whiteout("/".join(parts), os.path.join(self.upper, *parts), st)

    def hold(self, path: str, reason: str) -> None:
        """Mark ``path`` for review: ``apply()`` without paths leaves it alone."""
        self._update(path, held_reason=reason)

    def _update(self, path: str, **values: object) -> None:
        self.changes[path] = dataclasses.replace(self.changes[path], **values)

    def select(self, paths: Iterable[str] | None) -> list[str]:
        """The change paths ``paths`` stands for, parents first.

        None means every change not held (applied and discarded ones included, for the
        report to say so); a path means it and every change below it, plus
        the added directories above it that are still pending (so ``apply(["new/x"])``
        creates ``new``). An unknown path is an error.
        """
        if paths is None:
            return [c.path for c in self if c.held_reason is None or c.applied is not None]
        asked = {_normalize(raw) for raw in paths}
        if "" in asked:
            return list(self.changes)
        # One pass over the changes, each looking up its own ancestors: linear in the
        # changes (a pip install writes thousands), not changes x paths.
        wanted: set[str] = set()
        matched: set[str] = set()
        for p in self.changes:
            above = p
            while above:
                if above in asked:
                    wanted.add(p)
                    matched.add(above)
                    break
                above = posixpath.dirname(above)
        for rel in asked - matched:
            raise ChangeError(rel, "not in this change set")
        for rel in matched:
            parent = posixpath.dirname(rel)
            while parent:
                up = self.changes.get(parent)
                if up is not None and up.is_dir and up.kind != "deleted" and up.applied is None:
                    wanted.add(parent)
                parent = posixpath.dirname(parent)
        return [p for p in self.changes if p in wanted]


def _normalize(raw: str) -> str:
    rel = posixpath.normpath(os.fspath(raw).strip("/"))
    if rel == ".":
        return ""
    if rel.startswith("../") or rel == ".." or raw.startswith("/"):
        raise ChangeError(raw, "not a path inside the working dir")
    return rel


def _parts(rel: str) -> tuple[str, ...]:
    return tuple(rel.split("/")) if rel else ()


# --- markers ----------------------------------------------------------------------------


class Markers(Protocol):
    """How the upper says "deleted" and "opaque"; ``read_upper`` asks nothing else."""

    def is_whiteout(self, rel: str, path: str, st: os.stat_result) -> bool: ...

    def is_opaque(self, rel: str, path: str) -> bool: ...

    def check(self, rel: str, path: str, st: os.stat_result) -> None:
        """Raise ``UpperLayoutError`` for an entry that cannot be read as what it looks."""

    def listed_deletions(self) -> Iterable[str]:
        """Deleted paths that have no entry of their own in the upper."""

    def forget_deletion(self, rel: str) -> bool:
        """Drop a listed deletion (it was discarded); False if it was not listed."""


class OverlayMarkers:
    """overlayfs's own markers: a 0/0 character device, ``*.overlay.opaque=y``.

    Both ``trusted.`` (a root mount) and ``user.`` (userxattr) names are read. A
    redirected directory or a metacopy file (``redirect_dir=on``, ``metacopy=on``) has
    its data in the lower, not here: such an upper is refused, not misread.
    """

    def is_whiteout(self, rel: str, path: str, st: os.stat_result) -> bool:
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    def is_opaque(self, rel: str, path: str) -> bool:
        for name in _xattr_names(path):
            if name.endswith("overlay.redirect"):
                raise UpperLayoutError(f"{rel}: redirected directory (mount with redirect_dir=off)")
            if name in ("trusted.overlay.opaque", "user.overlay.opaque"):
                with contextlib.suppress(OSError):
                    if os.getxattr(path, name, follow_symlinks=False) == b"y":
                        return True
        return False

    def check(self, rel: str, path: str, st: os.stat_result) -> None:
        if stat.S_ISREG(st.st_mode) and any(
                n.endswith("overlay.metacopy") for n in _xattr_names(path)):
            raise UpperLayoutError(f"{rel}: metacopy file (mount with metacopy=off)")

    def listed_deletions(self) -> Iterable[str]:
        return ()

    def forget_deletion(self, rel: str) -> bool:
        return False


class ListedMarkers(OverlayMarkers):
    """Deletions and opaque directories given as lists, besides overlayfs's own markers.

    For an upper copied out of the sandbox where xattrs or device nodes could not be kept.
    A listed deleted path may be absent from the upper or present as a placeholder (any
    entry: it is not read).
    """

    def __init__(self, deleted: Iterable[str] = (), opaque: Iterable[str] = ()) -> None:
        self.deleted = {_normalize(p) for p in deleted}
        self.opaque = {_normalize(p) for p in opaque}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ListedMarkers:
        """Read ``{"deleted": [...], "opaque": [...]}`` (paths relative to the working dir)."""
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            data = json.load(f)
        return cls(data.get("deleted", ()), data.get("opaque", ()))

    def is_whiteout(self, rel: str, path: str, st: os.stat_result) -> bool:
        return rel in self.deleted or super().is_whiteout(rel, path, st)

    def is_opaque(self, rel: str, path: str) -> bool:
        return rel in self.opaque or super().is_opaque(rel, path)

    def listed_deletions(self) -> Iterable[str]:
        return sorted(self.deleted)

    def forget_deletion(self, rel: str) -> bool:
        if rel in self.deleted:
            self.deleted.discard(rel)
            return True
        return False


def _xattr_names(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:  # no xattrs on this filesystem
        return []


# --- walking a tree without following links ---------------------------------------------


class _Tree:
    """Directory fds of one tree, each opened from its parent with ``O_NOFOLLOW``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self._fds: dict[tuple[str, ...], int] = {
            (): os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}

    def dir(self, parts: tuple[str, ...]) -> int:
        """The fd of directory ``parts``; ``UnsafePath`` if a component is not a directory."""
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        parent = self.dir(parts[:-1])
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            rel = "/".join(parts)
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode):
                    raise UnsafePath(rel, "is a symlink on the host: nothing is written through "
                                     "it") from None
            raise UnsafePath(rel, "is not a directory on the host") from None
        self._fds[parts] = fd
        return fd

    def lstat(self, parts: tuple[str, ...]) -> os.stat_result | None:
        """``lstat`` of ``parts``, None if it (or a directory above it) does not exist."""
        try:
            if not parts:
                return os.stat(self._fds[()])
            return os.stat(parts[-1], dir_fd=self.dir(parts[:-1]), follow_symlinks=False)
        except (FileNotFoundError, UnsafePath):
            return None

    def forget(self, parts: tuple[str, ...]) -> None:
        """Close the fds of ``parts`` and below (it was removed or replaced)."""
        n = len(parts)
        for key in [k for k in self._fds if k and k[:n] == parts]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --- reading the upper ------------------------------------------------------------------


def read_upper(upper: str | os.PathLike[str], lower: str | os.PathLike[str], *,
               markers: Markers | None = None,
               baseline: Mapping[str, LowerState | None] | None = None,
               started_ns: int | None = None) -> ChangeSet:
    """The changes the upper holds over ``lower`` (the working dir).

    Only the upper is walked, and the lower only where the upper has an entry (and below
    a deleted or opaque directory, whose lower contents are deleted): the cost grows with
    the changes, not with the working dir.

    ``baseline`` (``snapshot_lower`` before the command) and ``started_ns``
    (``time.time_ns()`` before the command) detect host edits made while the command ran:
    such a path is in ``changed_during`` and ``apply`` will not touch it. With
    ``started_ns`` (``start_stamp()``), a non-directory whose ctime is later than the start
    counts as changed.
    """
    reader = _Reader(os.fspath(upper), os.fspath(lower), markers or OverlayMarkers())
    try:
        root_opaque = reader.markers.is_opaque("", reader.upper.root)
        if root_opaque:
            reader.opaque.add("")
        reader.walk((), lower_dir=True, opaque=root_opaque)
        for rel in reader.markers.listed_deletions():
            if rel not in reader.changes and rel not in reader.seen:
                reader.delete(_parts(rel), origin="listed")
    finally:
        reader.close()
    changes = reader.ordered()
    lower_state = {p: reader.state[p] for p in changes}
    during: dict[str, str] = {}
    for p, now in lower_state.items():
        if baseline is not None and p in baseline:
            before = baseline[p]
            if before != now and (before is None or not before.same_as(now)):
                during[p] = "changed on the host while the command ran"
        elif (started_ns is not None and now is not None and not now.is_dir
              and now.ctime_ns > started_ns):
            during[p] = "changed on the host while the command ran"
    return ChangeSet(lower=reader.lower.root, upper=reader.upper.root, changes=changes,
                     lower_state=lower_state, changed_during=during, skipped=reader.skipped,
                     started_ns=started_ns, markers=reader.markers,
                     deletion_origin=reader.origin, opaque=reader.opaque)


class _Reader:
    def __init__(self, upper: str, lower: str, markers: Markers) -> None:
        self.markers = markers
        self.upper = _Tree(upper)
        self.lower = _Tree(lower)
        self.changes: dict[str, Change] = {}
        self.state: dict[str, LowerState | None] = {}
        self.origin: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.seen: set[str] = set()
        self.opaque: set[str] = set()

    def close(self) -> None:
        self.upper.close()
        self.lower.close()

    def ordered(self) -> dict[str, Change]:
        # Parents before children: "a" < "a/b" < "a-b" in this key, unlike in plain sort.
        return {p: self.changes[p] for p in sorted(self.changes, key=_parts)}

    def add(self, change: Change, low: os.stat_result | None) -> None:
        self.changes[change.path] = change
        self.state[change.path] = _state(low)

    def walk(self, parts: tuple[str, ...], *, lower_dir: bool, opaque: bool) -> None:
        """Read directory ``parts`` of the upper; ``lower_dir``: the lower has it too."""
        base = os.path.join(self.upper.root, *parts)
        names: set[str] = set()
        with os.scandir(base) as entries:
            for entry in entries:
                names.add(entry.name)
                self.entry((*parts, entry.name), entry.path, entry.stat(follow_symlinks=False),
                           lower_dir=lower_dir, opaque=opaque)
        if opaque and lower_dir:  # the lower's own entries are hidden: deleted
            for name in self._lower_names(parts):
                if name not in names:
                    self.delete((*parts, name), origin="hidden")

    def _lower_names(self, parts: tuple[str, ...]) -> list[str]:
        try:
            return sorted(os.listdir(self.lower.dir(parts)))
        except (FileNotFoundError, UnsafePath):
            return []

    def entry(self, parts: tuple[str, ...], path: str, st: os.stat_result, *,
              lower_dir: bool, opaque: bool) -> None:
        rel = "/".join(parts)
        self.seen.add(rel)
        low = self.lower.lstat(parts) if lower_dir else None
        if self.markers.is_whiteout(rel, path, st):
            if low is not None:
                self.delete(parts, low=low, origin="whiteout")
            return
        self.markers.check(rel, path, st)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if low is not None and stat.S_ISDIR(low.st_mode):
                if stat.S_IMODE(mode) != stat.S_IMODE(low.st_mode):
                    self.add(Change(rel, "modified", True, 0, mode), low)
                own = self.markers.is_opaque(rel, path)
                if own:
                    self.opaque.add(rel)
                self.walk(parts, lower_dir=True, opaque=opaque or own)
                return
            kind: Kind = "added" if low is None else "modified"
            self.add(Change(rel, kind, True, 0, mode), low)
            self.walk(parts, lower_dir=False, opaque=False)
            return
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            self.skipped[rel] = "not a file, directory or symlink: never applied"
            return
        if low is not None and stat.S_ISDIR(low.st_mode):  # a directory replaced by this
            for name in self._lower_names(parts):
                self.delete((*parts, name), origin="hidden")
        if stat.S_ISLNK(mode):
            target = os.readlink(path)
            if low is not None and stat.S_ISLNK(low.st_mode) and os.readlink(
                    parts[-1], dir_fd=self.lower.dir(parts[:-1])) == target:
                return  # copied up, unchanged
            self.add(Change(rel, "added" if low is None else "modified", False, st.st_size,
                            mode, symlink=target), low)
            return
        new = _read_small(path, st.st_size)
        old: bytes | None = None
        if low is not None and stat.S_ISREG(low.st_mode):
            old = self._read_lower(parts, low.st_size)
            if low.st_size == st.st_size and stat.S_IMODE(low.st_mode) == stat.S_IMODE(mode) \
                    and (old == new if old is not None else self._same_content(parts, path)):
                return  # copied up (opened for writing, touched), unchanged
        kind = "added" if low is None else "modified"
        diff = None
        if new is not None and (low is None or old is not None):
            diff = _diff(rel, old, new, added=low is None)
        self.add(Change(rel, kind, False, st.st_size, mode, diff=diff), low)

    def _read_lower(self, parts: tuple[str, ...], size: int) -> bytes | None:
        if size > DIFF_LIMIT:
            return None
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.lower.dir(parts[:-1]))
        except (OSError, UnsafePath):
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(DIFF_LIMIT + 1)

    def _same_content(self, parts: tuple[str, ...], path: str) -> bool:
        try:
            lfd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=self.lower.dir(parts[:-1]))
        except (OSError, UnsafePath):
            return False
        with os.fdopen(lfd, "rb") as lf, open(path, "rb") as uf:
            while True:
                a, b = lf.read(_CHUNK), uf.read(_CHUNK)
                if a != b:
                    return False
                if not a:
                    return True

    def delete(self, parts: tuple[str, ...], *, low: os.stat_result | None = None,
               origin: str) -> None:
        """A deleted lower entry; a directory's contents are deleted one by one too."""
        rel = "/".join(parts)
        if low is None:
            low = self.lower.lstat(parts)
            if low is None:
                return
        is_dir = stat.S_ISDIR(low.st_mode)
        target = None
        if stat.S_ISLNK(low.st_mode):
            target = os.readlink(parts[-1], dir_fd=self.lower.dir(parts[:-1]))
        self.add(Change(rel, "deleted", is_dir, 0 if is_dir else low.st_size, low.st_mode,
                        symlink=target), low)
        self.origin[rel] = origin
        if is_dir:
            for name in self._lower_names(parts):
                self.delete((*parts, name), origin="hidden")


def _read_small(path: str, size: int) -> bytes | None:
    if size > DIFF_LIMIT:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(DIFF_LIMIT + 1)


def _text(data: bytes | None) -> list[str] | None:
    if data is None or len(data) > DIFF_LIMIT or b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _diff(rel: str, old: bytes | None, new: bytes, *, added: bool) -> str | None:
    b = _text(new)
    a = [] if added else _text(old)
    if a is None or b is None:
        return None
    return "".join(difflib.unified_diff(a, b, "/dev/null" if added else f"a/{rel}", f"b/{rel}"))


# --- applying ---------------------------------------------------------------------------


@dataclass
class ApplyReport:
    """What one ``apply`` call did, path by path.

    ``conflicts`` holds the paths where nothing was written and why (a ``ChangeConflict``,
    an ``UnsafePath`` or another ``ChangeError``); ``notes`` what was applied but deserves
    a word (set-ID bits removed, a link out of the working dir).
    """

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    conflicts: dict[str, ChangeError] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def raise_for_conflicts(self) -> None:
        """Raise the first conflict, naming how many there were."""
        if self.conflicts:
            first = next(iter(self.conflicts.values()))
            more = len(self.conflicts) - 1
            if more:
                raise type(first)(first.path, f"{first.reason} (and {more} more path(s))")
            raise first


def apply(changeset: ChangeSet, paths: Iterable[str] | None = None, *,
          fsync: bool = False) -> ApplyReport:
    """Write the selected changes into the working dir (``ChangeSet.select``).

    Deletions go first, deepest first; then additions and modifications, parents first;
    directory modes are set last (a read-only directory still receives its contents).
    Each path is checked against its recorded host state just before it is written.
    """
    report = ApplyReport()
    selected = changeset.select(paths)
    chosen = set(selected)
    todo: list[Change] = []
    for p in selected:
        c = changeset[p]
        waits = _held_above(changeset, p, chosen)
        if c.applied:
            report.skipped[p] = "already applied"
        elif c.applied is False:
            report.skipped[p] = "discarded"
        elif waits:
            report.skipped[p] = f"waits for {waits}, held for review"
        else:
            todo.append(c)
    applier = _Applier(changeset, report, fsync)
    try:
        deletions = [c for c in todo if c.kind == "deleted"]
        for c in sorted(deletions, key=lambda c: _parts(c.path), reverse=True):
            applier.run(c)
        for c in todo:
            if c.kind != "deleted":
                applier.run(c)
        applier.set_dir_modes()
    finally:
        applier.close()
    return report


def _held_above(changeset: ChangeSet, path: str, chosen: set[str]) -> str | None:
    parent = posixpath.dirname(path)
    while parent:
        c = changeset.changes.get(parent)
        if c is not None and c.applied is None and c.kind != "deleted" and parent not in chosen:
            return parent
        parent = posixpath.dirname(parent)
    return None


class _Applier:
    def __init__(self, changeset: ChangeSet, report: ApplyReport, fsync: bool) -> None:
        self.cs = changeset
        self.report = report
        self.fsync = fsync
        self.host = _Tree(changeset.lower)
        self.upper = _Tree(changeset.upper)
        self.dir_modes: list[tuple[Change, int]] = []

    def close(self) -> None:
        self.host.close()
        self.upper.close()

    def run(self, c: Change) -> None:
        try:
            self._check(c)
            if c.kind == "deleted":
                self._delete(c)
            elif c.is_dir:
                self._dir(c)
            else:
                self._file(c)
        except ChangeError as e:
            self.report.conflicts[c.path] = e
            return
        except OSError as e:
            self.report.conflicts[c.path] = ChangeError(c.path, e.strerror or str(e))
            return
        self.cs._update(c.path, applied=True)
        self.report.applied.append(c.path)
        if c.mode & _SETID and c.kind != "deleted":
            self.report.notes[c.path] = (f"set-ID bits removed (mode {stat.S_IMODE(c.mode):o} "
                                         f"applied as {stat.S_IMODE(c.mode) & ~_SETID:o})")
        if c.kind != "deleted" and c.link_leaves_workdir:
            self.report.notes[c.path] = (f"symlink to {c.symlink!r}, outside the working dir: "
                                         "written as a link, not followed")

    def _check(self, c: Change) -> None:
        during = self.cs.changed_during.get(c.path)
        if during:
            raise ChangeConflict(c.path, during)
        parts = _parts(c.path)
        try:
            self.host.dir(parts[:-1])  # UnsafePath if the way there is not plain directories
        except FileNotFoundError:
            raise ChangeError(c.path, "its directory is not on the host (not applied?)") from None
        now = _state(self.host.lstat(parts))
        then = self.cs.lower_state.get(c.path)
        if then is None:
            if now is not None:
                raise ChangeConflict(c.path, "created on the host after the command started")
        elif not then.same_as(now):
            what = "removed" if now is None else "changed"
            raise ChangeConflict(c.path, f"{what} on the host after the command started")

    def _delete(self, c: Change) -> None:
        parts = _parts(c.path)
        parent = self.host.dir(parts[:-1])
        if c.is_dir:
            self.host.forget(parts)
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise ChangeConflict(c.path, "directory not deleted: it holds entries this "
                                         "change set does not delete") from None
                raise
        else:
            os.unlink(parts[-1], dir_fd=parent)

    def _clear_dir(self, parts: tuple[str, ...], parent: int) -> None:
        """Remove the (emptied) host directory a file or symlink replaces."""
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self.host.forget(parts)
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise ChangeConflict("/".join(parts), "directory to replace is not empty"
                                         ) from None
                raise

    def _dir(self, c: Change) -> None:
        parts = _parts(c.path)
        parent = self.host.dir(parts[:-1])
        old = self.cs.lower_state.get(c.path)
        if old is not None and not old.is_dir:  # a file or symlink replaced by a directory
            os.unlink(parts[-1], dir_fd=parent)
        if old is None or not old.is_dir:
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        self.dir_modes.append((c, stat.S_IMODE(c.mode) & ~_SETID))

    def set_dir_modes(self) -> None:
        for c, mode in sorted(self.dir_modes, key=lambda cm: _parts(cm[0].path), reverse=True):
            try:
                fd = self.host.dir(_parts(c.path))
                os.fchmod(fd, mode)
            except (OSError, ChangeError) as e:
                self.report.notes[c.path] = f"mode {mode:o} not set: {e}"

    def _file(self, c: Change) -> None:
        parts = _parts(c.path)
        parent = self.host.dir(parts[:-1])
        tmp = f".gvisor-magic-{secrets.token_hex(6)}.tmp"
        try:
            if c.symlink is not None:
                os.symlink(c.symlink, tmp, dir_fd=parent)
            else:
                self._copy_in(parts, tmp, parent, stat.S_IMODE(c.mode) & ~_SETID)
            if self.cs.lower_state.get(c.path) is not None:
                self._clear_dir(parts, parent)
            os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            tmp = ""
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
        if self.fsync:
            os.fsync(parent)

    def _copy_in(self, parts: tuple[str, ...], tmp: str, parent: int, mode: int) -> None:
        if self.cs.movable and self._move_in(parts, tmp, parent, mode):
            return
        src = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=self.upper.dir(parts[:-1]))
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise ChangeError("/".join(parts), "no longer a regular file in the upper")
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=parent)
            try:
                _copy_data(src, dst, st.st_size)
                os.fchmod(dst, mode)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                if self.fsync:
                    os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)


    def _move_in(self, parts: tuple[str, ...], tmp: str, parent: int, mode: int) -> bool:
        """Rename the upper's file to ``tmp`` (same filesystem), then give it ``mode``:
        whether it moved (False: copy it)."""
        upper = self.upper.dir(parts[:-1])
        st = os.lstat(parts[-1], dir_fd=upper)
        if not stat.S_ISREG(st.st_mode):
            raise ChangeError("/".join(parts), "no longer a regular file in the upper")
        try:
            os.rename(parts[-1], tmp, src_dir_fd=upper, dst_dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EACCES):
                return False
            raise
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.fchmod(fd, mode)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return True


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy ``src`` to ``dst`` in the kernel when it can (``copy_file_range``, ``sendfile``)."""
    copied = 0
    for call in (getattr(os, "copy_file_range", None), os.sendfile):
        if call is None:
            continue
        try:
            while True:
                if call is os.sendfile:
                    n = os.sendfile(dst, src, None, _CHUNK * 8)
                else:
                    n = call(src, dst, _CHUNK * 8)
                if n == 0:
                    return
                copied += n
        except OSError as e:
            if copied or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                         errno.EOPNOTSUPP):
                raise
    while True:
        data = os.read(src, _CHUNK)
        if not data:
            return
        os.write(dst, data)


# --- discarding -------------------------------------------------------------------------


@dataclass
class DiscardReport:
    """What one ``discard`` call removed; ``notes`` where the upper could not say it."""

    discarded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, ChangeError] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def discard(changeset: ChangeSet, paths: Iterable[str] | None = None) -> DiscardReport:
    """Remove the selected changes from the upper and mark them discarded.

    ``paths`` as in ``ChangeSet.select``, except that None means every change, held ones
    included. An applied change is skipped (the working dir has it now). A
    deletion below an opaque directory cannot be undone in the upper alone: it is marked
    discarded and the report notes it.
    """
    report = DiscardReport()
    selected = list(changeset.changes) if paths is None else changeset.select(paths)
    upper = _Tree(changeset.upper)
    try:
        for p in sorted(selected, key=_parts, reverse=True):
            c = changeset[p]
            if c.applied:
                report.skipped[p] = "already applied"
                continue
            if c.applied is False:
                report.skipped[p] = "already discarded"
                continue
            try:
                _discard_one(changeset, c, upper, report)
            except ChangeError as e:
                report.errors[p] = e
                continue
            except OSError as e:
                report.errors[p] = ChangeError(p, str(e))
                continue
            changeset._update(p, applied=False, held_reason=DISCARDED)
            report.discarded.append(p)
    finally:
        upper.close()
    report.discarded.reverse()
    return report


def _discard_one(cs: ChangeSet, c: Change, upper: _Tree, report: DiscardReport) -> None:
    parts = _parts(c.path)
    if c.kind == "deleted":
        origin = cs.deletion_origin.get(c.path)
        if origin == "listed" and cs.markers is not None:
            cs.markers.forget_deletion(c.path)
        if origin in ("whiteout", "listed"):
            with contextlib.suppress(FileNotFoundError, UnsafePath):
                os.unlink(parts[-1], dir_fd=upper.dir(parts[:-1]))
        elif origin == "hidden":
            report.notes[c.path] = "still hidden in the upper (opaque or replaced directory)"
        return
    try:
        parent = upper.dir(parts[:-1])
    except (FileNotFoundError, UnsafePath):
        return  # its directory was discarded already
    if c.is_dir:
        upper.forget(parts)
        _remove_tree(parent, parts[-1])
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(parts[-1], dir_fd=parent)


def _remove_tree(parent: int, name: str) -> None:
    """``rm -rf`` of ``name`` in ``parent``, never following a symlink."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            os.unlink(name, dir_fd=parent)
            return
        raise
    try:
        for child in os.listdir(fd):
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)
