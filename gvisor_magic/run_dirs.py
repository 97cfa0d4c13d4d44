"""Run dirs: the private directory of one sandbox (its state, bundle, generated ``/etc``) or
of a one-shot run's scratch working dir, named after the process that made it
(``gvisor-magic-PID-XXXXXXXX``).

The name carries the maker's pid so that a later run can tell the dirs of a process that
died without cleaning up (a kernel killed with SIGKILL) and remove them: their sandboxes
ended with their owner (the agent sees its channel close; a one-shot's runsc dies with
its pipes). Every run makes one, so every run reclaims what dead processes left: their
run dirs here, the private dirs of "Python 3 (gVisor)" kernels whose server died
(below) and their memory cgroups (``memory.remove_orphan_cgroups``).

Neutral and light: the standard library at import time (psutil and the reclaimer of
cgroups only when reclaiming), so that the backends, the runner and the kernel's
provisioner use it without importing one another.

Kernel dirs
-----------
The private dirs of "Python 3 (gVisor)" kernels, and reclaiming those a dead server left
(and the sandbox a killed kernel launcher left: ``remove_run_dirs_of``).

Each kernel has a directory of its own (mode 0700) holding a copy of its connection file
(with the HMAC key of its channels) and its five ZMQ IPC sockets. It is named
``gvisor-magic-kernel-PID-XXXXXXXX`` after the server (the process of the provisioner),
and the provisioner removes it when the kernel shuts down. A server killed with SIGKILL
cannot; so, as for every sandbox dir (``make_run_dir``), the next run or
kernel start of the same user removes the dirs whose server no longer runs, first killing
what still mentions them (the orphaned launcher; its sandbox ends with it).

Not named like a sandbox run dir (``gvisor-magic-PID-X``) on purpose: a kernel's dir is
also mounted inside its own sandbox, where the server's pid does not exist, and a run made
there must not take it for a leftover. Nothing is reclaimed from inside gVisor.

Every run calls ``remove_orphan_kernel_dirs``.
"""

from __future__ import annotations

import contextlib
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
    from .memory import remove_orphan_cgroups

    os.makedirs(base, mode=0o700, exist_ok=True)
    remove_orphans(base, owner_of, "sandbox directory")
    remove_orphan_kernel_dirs()  # and those of killed Jupyter servers (below)
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


KERNEL_PREFIX = "gvisor-magic-kernel-"
#: A socket path is at most 107 bytes: ``DIR/k-N`` must fit.
MAX_DIR = 80


def sockets_base() -> str:
    """Where kernels' private dirs go: the temporary dir, or /tmp when that is too deep."""
    base = tempfile.gettempdir()
    return base if len(base) <= MAX_DIR - 40 else "/tmp"


def make_kernel_dir() -> str:
    """A new private dir for one kernel, named after this process; reclaims dead ones first."""
    base = sockets_base()
    remove_orphan_kernel_dirs(base)
    return tempfile.mkdtemp(prefix=f"{KERNEL_PREFIX}{os.getpid()}-", dir=base)


def kernel_owner_of(name: str) -> int | None:
    """The server pid in a kernel dir's name, or None if ``name`` is not one."""
    if not name.startswith(KERNEL_PREFIX):
        return None
    pid, sep, rest = name[len(KERNEL_PREFIX):].partition("-")
    if not sep or not rest or not pid.isdigit():
        return None
    return int(pid)


def remove_orphan_kernel_dirs(base: str | None = None) -> list[str]:
    """Remove this user's kernel dirs in ``base`` (``sockets_base()`` by default) whose
    server no longer runs; return the paths removed."""
    from .detect import inside_gvisor

    if inside_gvisor():
        return []  # our own kernel's dir is mounted here, and its server is not visible
    return remove_orphans(base or sockets_base(), kernel_owner_of, "kernel dir")


def remove_run_dirs_of(pid: int, base: str, wait: float = 10.0) -> list[str]:
    """Remove what process ``pid`` (a kernel's launcher that was killed) left in ``base``:
    its sandboxes' processes (killed, and waited for, at most ``wait`` seconds), their
    run dirs and memory cgroups. Nothing while ``pid`` runs; return the dirs removed.

    The launcher removes its sandbox itself when it is stopped by a signal it can catch;
    a SIGKILL (Jupyter's, when a kernel did not exit in time) leaves it all behind, and
    the next run would only reclaim it later.
    """
    import time

    import psutil

    from .memory import remove_orphan_cgroups

    dirs = run_dirs_of(pid, base)
    if not dirs or psutil.pid_exists(pid):
        return []
    victims = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
        except (psutil.Error, KeyError):
            continue
        if any(path in part for path in dirs for part in cmdline):
            victims.append(process)
    for process in victims:
        log.info("gvisor: killing process %s of the sandbox of killed launcher %s",
                 process.pid, pid)
        with contextlib.suppress(psutil.Error):
            process.kill()
    deadline = time.monotonic() + wait
    while victims and time.monotonic() < deadline:
        victims = [process for process in victims if _lives(process)]
        if victims:
            time.sleep(0.05)
    if victims:
        log.warning("gvisor: processes %s of the sandbox of killed launcher %s did not end",
                    [process.pid for process in victims], pid)
    for path in dirs:
        log.info("gvisor: removing %s, left by the kernel's launcher %s (killed)", path, pid)
        shutil.rmtree(path, ignore_errors=True)
    remove_orphan_cgroups()
    return dirs


def _lives(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
