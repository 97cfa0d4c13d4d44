"""Run dirs: the private directory of one sandbox (its state, bundle, generated ``/etc``) or
of a one-shot run's scratch working dir, named after the process that made it
(``gvisor-magic-PID-XXXXXXXX``).

The name carries the maker's pid so that a later run can tell the dirs of a process that
died without cleaning up (a kernel killed with SIGKILL) and remove them: their sandboxes
ended with their owner (the agent sees its channel close; a one-shot's runsc dies with
its pipes). Every run makes one, so every run reclaims what dead processes left: their
run dirs here, the private dirs of "Python 3 (gVisor)" kernels whose server died
(``backends.kernel_dirs``) and their memory cgroups (``memory.remove_orphan_cgroups``).

Neutral and light: the standard library at import time (psutil and the reclaimers of
kernel dirs and cgroups only when reclaiming), so that the backends and the runner use it
without importing one another, and ``backends.kernel_dirs`` finds the run dirs a killed
kernel launcher left (``run_dirs_of``).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable

log = logging.getLogger("gvisor_magic")

#: A run dir's name: ``PREFIX`` + the maker's pid + ``-`` + a random suffix.
PREFIX = "gvisor-magic-"


def owner_of(name: str) -> int | None:
    """The pid in a run dir's name (``gvisor-magic-PID-X``), or None if ``name`` is not one."""
    parts = name.split("-")
    if len(parts) != 4 or parts[:2] != ["gvisor", "magic"] or not parts[2].isdigit():
        return None
    return int(parts[2])


def run_dirs_of(pid: int, base: str) -> list[str]:
    """The run dirs that process ``pid`` made in ``base``."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return [os.path.join(base, name) for name in names if owner_of(name) == pid]


def make_run_dir(base: str) -> str:
    """A private directory for one sandbox in ``base``, named after this process; first
    removes what processes that no longer run left (see the top)."""
    from .backends.kernel_dirs import remove_orphan_kernel_dirs
    from .memory import remove_orphan_cgroups

    os.makedirs(base, mode=0o700, exist_ok=True)
    remove_orphans(base, owner_of, "sandbox directory")
    remove_orphan_kernel_dirs()  # and those of killed Jupyter servers (kernel_dirs.py)
    remove_orphan_cgroups()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)


def remove_orphans(base: str, owner: Callable[[str], int | None], what: str) -> list[str]:
    """Remove this user's dirs in ``base`` named after a process (``owner``: the pid in a
    name, None for another name) that no longer runs, first killing what still mentions
    them (``what`` they are, for the log); return the paths removed. Imports psutil only
    when there is a candidate."""
    try:
        found = [(name, pid) for name in os.listdir(base)
                 if (pid := owner(name)) is not None and pid != os.getpid()]
    except OSError:
        return []
    if not found:
        return []
    import psutil

    from .process import kill_processes_mentioning

    removed = []
    for name, pid in found:
        if psutil.pid_exists(pid):
            continue
        path = os.path.join(base, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
            continue
        log.info("gvisor: removing %s %s, left by process %s that no longer runs",
                 what, path, pid)
        kill_processes_mentioning(path, what)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
