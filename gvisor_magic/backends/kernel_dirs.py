"""The private dirs of "Python 3 (gVisor)" kernels, and reclaiming those a dead server left
(and the sandbox a killed kernel launcher left: ``remove_run_dirs_of``).

Each kernel has a directory of its own (mode 0700) holding a copy of its connection file
(with the HMAC key of its channels) and its five ZMQ IPC sockets. It is named
``gvisor-magic-kernel-PID-XXXXXXXX`` after the server (the process of the provisioner),
and the provisioner removes it when the kernel shuts down. A server killed with SIGKILL
cannot; so, as for every sandbox dir (``run_dirs.make_run_dir``), the next run or
kernel start of the same user removes the dirs whose server no longer runs, first killing
what still mentions them (the orphaned launcher; its sandbox ends with it).

Not named like a sandbox run dir (``gvisor-magic-PID-X``) on purpose: a kernel's dir is
also mounted inside its own sandbox, where the server's pid does not exist, and a run made
there must not take it for a leftover. Nothing is reclaimed from inside gVisor.

Light on purpose (stdlib, psutil): every run calls ``remove_orphan_kernel_dirs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

from ..run_dirs import remove_orphans, run_dirs_of

log = logging.getLogger("gvisor_magic")

PREFIX = "gvisor-magic-kernel-"
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
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)


def owner_of(name: str) -> int | None:
    """The server pid in a kernel dir's name, or None if ``name`` is not one."""
    if not name.startswith(PREFIX):
        return None
    pid, sep, rest = name[len(PREFIX):].partition("-")
    if not sep or not rest or not pid.isdigit():
        return None
    return int(pid)


def remove_orphan_kernel_dirs(base: str | None = None) -> list[str]:
    """Remove this user's kernel dirs in ``base`` (``sockets_base()`` by default) whose
    server no longer runs; return the paths removed."""
    from ..detect import inside_gvisor

    if inside_gvisor():
        return []  # our own kernel's dir is mounted here, and its server is not visible
    return remove_orphans(base or sockets_base(), owner_of, "kernel dir")


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

    from ..memory import remove_orphan_cgroups

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
