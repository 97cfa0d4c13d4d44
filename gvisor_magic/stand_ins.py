"""Empty stand-ins for protected paths that do not exist, shared by concurrent sandboxes.

A read-only mount needs a mount point, and runsc would create a missing one on
the host itself, as a directory with mode 0777 (seen with 20240729): a
world-writable ``.ipython`` in a home. So the host creates it first, empty,
private (0700 directories, 0644 empty files) and owned like its parent, and
removes it when the last sandbox using it ends. It must stay while any
sandbox uses it: gVisor revalidates a bind mount's dentries against the host,
and a mount point deleted on the host takes its mount away inside (seen here:
after the host removed a stand-in, the sandbox wrote through).

Several kernels of one user often share a home, so the stand-ins of all of
this user's sandboxes are recorded in one registry file (locked with
``flock``). An entry whose owners have all exited (a caller killed with SIGKILL
cannot release its own) is removed by the next run of the same user, whatever
that run needs: every run plans its protection, and the plan reads the registry
(``current``), so the reclaim costs nothing more than that read when there is
nothing to reclaim. Before a dead owner's stand-ins go, what still serves its
sandboxes is killed (runsc's processes carry the owner's run dir,
``gvisor-magic-PID-...``, on their command lines): a sandbox outliving its caller
must not see its mount points removed under it. A Docker container of a dead caller
is not killed from here (it may be another pid namespace's): its caller's stand-ins
stay until it has ended.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator, Sequence

log = logging.getLogger("gvisor_magic")


def registry_path() -> str:
    return os.path.join(tempfile.gettempdir(), f"gvm-stand-ins-{os.getuid()}.json")


@contextlib.contextmanager
def _locked() -> Iterator[dict]:
    """The registry, locked; written back (or removed when empty) on exit."""
    path = registry_path()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # not removed while we waited for the lock
            break
        os.close(fd)
    try:
        with os.fdopen(os.dup(fd), "r+") as handle:
            try:
                data = json.loads(handle.read() or "{}")
            except ValueError:
                data = {}
            if not isinstance(data, dict):
                data = {}
            yield data
            if data:
                handle.seek(0)
                handle.truncate()
                json.dump(data, handle)
            else:
                os.unlink(path)
    finally:
        os.close(fd)


def _alive(owner: str) -> bool:
    pid = int(owner.split(":", 1)[0])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identity(path: str) -> list[int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return [info.st_dev, info.st_ino]


class StandIns:
    """The stand-ins one sandbox holds; ``release`` removes those no one else holds."""

    def __init__(self) -> None:
        self.owner = f"{os.getpid()}:{secrets.token_hex(4)}"
        self.paths: list[str] = []

    def acquire(self, wanted: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Make sure each ``(path, kind)`` exists; return those that could not be made."""
        failed = []
        with _locked() as registry:
            _forget_dead(registry)
            for path, kind in wanted:
                entry = registry.get(path)
                if entry is not None and _identity(path) == entry["id"]:
                    entry["owners"].append(self.owner)
                    self.paths.append(path)
                    continue
                registry.pop(path, None)
                if os.path.lexists(path):
                    continue  # someone else's real file now: it is mounted as it is
                try:
                    made = _create(path, kind)
                except OSError as exc:
                    log.warning("gvisor: cannot create a stand-in for %s: %s", path, exc)
                    failed.append((path, kind))
                    continue
                for item in made:
                    registry[item] = {"id": _identity(item), "owners": [self.owner]}
                    self.paths.append(item)
        return failed

    def release(self) -> list[str]:
        """Drop this sandbox's claim; remove stand-ins no live sandbox holds. Returns leftovers."""
        if not self.paths:
            return []
        with _locked() as registry:
            for path in self.paths:
                entry = registry.get(path)
                if entry is not None and self.owner in entry["owners"]:
                    entry["owners"].remove(self.owner)
            self.paths = []
            return _forget_dead(registry)


def current() -> frozenset[str]:
    """The stand-ins that exist now (the scan treats them as the missing paths they stand for).

    First removes those whose owners all ended (see the module's doc): this is read by
    every run's protection plan, so that run reclaims what a killed caller left.
    """
    if not os.path.exists(registry_path()):
        return frozenset()
    with _locked() as registry:
        _forget_dead(registry, quiet=True)
        return frozenset(path for path, entry in registry.items()
                         if _identity(path) == entry.get("id"))


def sweep() -> None:
    """Remove stand-ins that no sandbox holds any more and that are empty again.

    Called after the post-run check, which may have emptied one (by moving what
    a command created in it to quarantine).
    """
    if os.path.exists(registry_path()):
        with _locked() as registry:
            _forget_dead(registry, quiet=True)


def _forget_dead(registry: dict, quiet: bool = False) -> list[str]:
    """Remove stand-ins whose owners all ended, deepest first; return those kept (not empty).

    A kept one stays in the registry, so a later sweep removes it once it is empty.
    """
    kept = []
    owners = {owner for entry in registry.values() for owner in entry.get("owners", [])}
    dead = {owner for owner in owners if not _alive(owner)}
    for pid in sorted({owner.split(":", 1)[0] for owner in dead}):
        of_pid = {owner for owner in dead if owner.split(":", 1)[0] == pid}
        if not of_pid <= _ended:
            _end_sandboxes_of(pid)
            _ended.update(of_pid)
        if _docker_runs_for(pid):  # its stand-ins stay until that container has ended
            dead -= of_pid
    for path in sorted(registry, key=lambda p: -p.count("/")):
        entry = registry[path]
        entry["owners"] = [o for o in entry.get("owners", []) if o not in dead]
        if entry["owners"]:
            continue
        if _identity(path) != entry.get("id"):
            del registry[path]  # gone, or replaced by someone: not ours any more
            continue
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.rmdir(path)
            elif os.lstat(path).st_size == 0:
                os.unlink(path)
            else:
                kept.append(path)
                continue
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                kept.append(path)
                continue
        del registry[path]
    if kept and not quiet:
        log.info("gvisor: keeping stand-ins %s until they are empty again", ", ".join(kept))
    return kept


#: Dead owners whose runsc sandboxes this process has already ended (once is enough: a
#: dead caller starts none; an owner names one ``StandIns``, so a reused pid is a new one).
_ended: set[str] = set()


def _end_sandboxes_of(pid: str) -> None:
    """Kill what still serves the sandboxes of ``pid``, a caller that no longer runs.

    A one-shot ``runsc run`` is in a session of its own and outlives a caller killed with
    SIGKILL until its command ends; its run dir (``run_dirs.make_run_dir``), on the
    command lines of runsc and its gofer and sandbox processes, is named after the caller.
    """
    from .process import kill_processes_mentioning
    from .run_dirs import PREFIX

    kill_processes_mentioning(f"{PREFIX}{pid}-", "a sandbox whose caller no longer runs")


#: The label the Docker backend puts on its containers (``backends.docker.LABEL``).
DOCKER_OWNER_LABEL = "io.github.gvisor-magic.owner-pid"


def _docker_runs_for(pid: str) -> bool:
    """Whether dockerd still runs a container the Docker backend made for ``pid``.

    Such a container outlives a caller killed with SIGKILL until its command ends, and it
    is not killed from here: it may be another pid namespace's, sharing the daemon. Asked
    only when an owner has died; no Docker socket (or no right to use it) means none.
    """
    host = os.environ.get("DOCKER_HOST", "")
    socket_path = host[len("unix://"):] if host.startswith("unix://") else "/var/run/docker.sock"
    if (host and not host.startswith("unix://")) or not os.access(socket_path, os.R_OK | os.W_OK):
        return False
    import urllib.parse

    from .install.docker_runtime import DockerError, docker_api

    filters = urllib.parse.quote(json.dumps({"label": [f"{DOCKER_OWNER_LABEL}={pid}"]}))
    try:
        _, data = docker_api("GET", f"/containers/json?filters={filters}",
                             socket_path=socket_path, timeout=5)
        return bool(json.loads(data))
    except (DockerError, ValueError) as exc:
        log.info("gvisor: cannot ask Docker about containers of %s (%s); keeping its "
                 "stand-ins for now", pid, exc)
        return True


def _create(path: str, kind: str) -> list[str]:
    """Create ``path`` (and missing parents), private and owned like the nearest parent."""
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    parent = os.lstat(probe)
    if not stat.S_ISDIR(parent.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", probe)
    made = []
    try:
        for item in reversed(missing):
            if item == path and kind == "file":
                fd = os.open(item, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                os.close(fd)
            else:
                os.mkdir(item, 0o700)
            made.append(item)
            if os.geteuid() == 0 and (parent.st_uid, parent.st_gid) != (0, 0):
                os.lchown(item, parent.st_uid, parent.st_gid)
    except OSError:
        for item in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(item) if os.path.isdir(item) else os.unlink(item)
        raise
    return made
