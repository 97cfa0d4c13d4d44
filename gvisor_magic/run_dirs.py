"""Run dirs: the private directory of one sandbox (its state, bundle, generated ``/etc``) or
of a one-shot run's scratch working dir, named after the process that made it
(``gvisor-magic-PID-XXXXXXXX``).

The name carries the maker's pid so that the dirs of a process that died without cleaning
up (a kernel killed with SIGKILL) can be told and removed: their sandboxes ended with their
owner (the agent sees its channel close; a one-shot's runsc dies with its pipes).

- At once, by the owner's **watcher** (``watch_owner``): the first run dir a process makes
  in a base starts one small detached process that waits for the owner's exit (a pidfd)
  and then removes what the owner left there, killing what still mentions it first. A
  sandbox kept booted for a next call (``warm.WarmPool.prepare``) has no next call to
  reclaim it when its kernel is killed with SIGKILL, which is how nbval and a hurried
  Jupyter stop kernels.
- And by the next run, as a backstop (a watcher cannot outlive a machine's reboot or a
  kill of its own): every run makes one, so every run reclaims what dead processes left:
  their run dirs here, the private dirs of "Python 3 (gVisor)" kernels whose server died
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
import threading
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
    watch_owner(base)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)


#: (pid, base) pairs whose watcher runs: one per process and base (a forked child has a
#: pid of its own, so it starts its own).
_WATCHED: set[tuple[int, str]] = set()
_WATCH_LOCK = threading.Lock()

#: The watcher, run by this Python with ``-I -S`` (nothing imported but built-ins until
#: the owner has gone). argv: OWNER BASE PACKAGE_PARENT. It forks once and the first
#: process exits, so the watcher is nobody's child and in a session of its own: a kill of
#: the owner's process group (Jupyter's SIGKILL of a kernel) does not reach it. It waits on
#: a pidfd of the owner, holding nothing else (cwd /, no fds), and when the owner has
#: exited and left run dirs in BASE, becomes this Python with ``remove_run_dirs_of``.
#: The text of the run dirs' prefix is built, not written, so that the watcher's command
#: line never looks like a sandbox's (tests and ``remove_orphans`` find those by it).
WATCH = """\
import os, select, sys, time
if os.fork():
    os._exit(0)
os.chdir("/")
owner, base, package = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    fd = os.pidfd_open(owner)
except ProcessLookupError:
    fd = None
except OSError:
    fd = -1
if fd is None:
    pass
elif fd >= 0:
    select.select([fd], [], [])
else:
    while True:
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(1.0)
prefix = "-".join(("gvisor", "magic", str(owner), ""))
try:
    left = [name for name in os.listdir(base) if name.startswith(prefix)]
except OSError:
    left = []
if left:
    os.execv(sys.executable, [sys.executable, "-c",
             "import sys; sys.path.insert(0, sys.argv[1]); "
             "from gvisor_magic.run_dirs import remove_run_dirs_of; "
             "remove_run_dirs_of(int(sys.argv[2]), sys.argv[3])",
             package, str(owner), base])
"""


def watch_owner(base: str) -> None:
    """Start this process's watcher of ``base`` (see the top) unless it runs; a few ms, once.
    Not inside gVisor, where nothing is reclaimed; a watcher that cannot start is logged
    and left to the next run's reclaiming."""
    import subprocess
    import sys

    from .detect import inside_gvisor

    key = (os.getpid(), os.path.realpath(base))
    with _WATCH_LOCK:
        if key in _WATCHED or inside_gvisor():
            return
        _WATCHED.add(key)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", WATCH, str(key[0]), key[1],
                        package], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
                       check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("gvisor: no watcher of %s for this process (%s); what a kill of it "
                    "leaves there is reclaimed by the next run", base, exc)


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
    if not dirs or _lives_pid(pid):
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


def _lives_pid(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet waited for, does not)."""
    import psutil

    try:
        return _lives(psutil.Process(pid))
    except psutil.Error:
        return False


def _lives(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
