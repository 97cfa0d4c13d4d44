"""``Limits.memory`` for runsc: a host memory cgroup where possible, else a watchdog.

runsc runs with ``--ignore-cgroups`` (its own cgroup set-up failed here, see
SECURITY.md), and the rlimits gVisor enforces are per process: without more,
one command allocated 12 GB of the host's memory. gVisor keeps all of a
sandbox's memory (its processes' pages, its tmpfs) in its own host processes,
so bounding those bounds the sandbox:

- **cgroup**: a memory cgroup of our own, made below the caller's (v1
  ``memory`` controller, or a delegated cgroup v2 subtree); ``runsc run`` is
  started inside it, so the sandbox and its gofer are too. The host kernel
  enforces the limit and OOM-kills the sandbox when it is crossed. Needs a
  writable cgroup: root on a host, or a pod with a delegated cgroup.
- **watchdog**: elsewhere (an ordinary user, an unprivileged pod), a thread
  samples the sandbox's memory every ``WATCH_INTERVAL`` seconds and kills the
  sandbox when a sample is over the limit (``SandboxMemory`` says what it counts).
  It reacts after the fact and only to what it samples: memory held at a sample is
  seen, a burst allocated and freed between two samples is not, and a sample may
  come only after a command allocated past the limit (the overshoot measured here
  is in SECURITY.md).

Either way the result says ``memory limit`` in ``details`` and ``error``, with
exit status 137, as an OOM kill reads in a shell.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

import psutil

log = logging.getLogger("gvisor_magic")

ENV_MEMORY_GUARD = "GVISOR_MAGIC_MEMORY_GUARD"  # "auto" (default), "cgroup" or "watchdog"
WATCH_INTERVAL = 0.1
#: What the watchdog bounds, in the words the enforcement summary, the widget and the docs
#: use; it never claims more (a burst between two samples is not seen).
WATCHDOG_BOUND = (f"a watchdog samples the sandbox's memory every {WATCH_INTERVAL:g} s and kills "
                  "the sandbox when a sample is over the limit; memory allocated and freed "
                  "between two samples is not seen, and the kill comes after the sample "
                  "that crossed the limit")
#: After an OOM kill in a warm sandbox, how long its memory may stay at the limit before the
#: whole sandbox is killed. Seen here (runsc 20240729, cgroup v1): the OOM killer ended one
#: stub process of a Python kernel, the memory stayed at the limit and the sandbox hung
#: with its command still "running"; usually the command dies and the memory is freed.
STUCK_GRACE = 2.0
OOM_RETURNCODE = 137
_V1 = "/sys/fs/cgroup/memory"
_V2 = "/sys/fs/cgroup"


def _own_cgroup_dir() -> tuple[str, str] | None:
    """(version, directory) of the cgroup this process is in, where children can be made."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            path = os.path.join(_V1, parts[2].lstrip("/"))
            if os.path.isdir(path) and os.access(path, os.W_OK):
                return "v1", path
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and os.path.exists(
                os.path.join(_V2, "cgroup.controllers")):
            path = os.path.join(_V2, parts[2].lstrip("/"))
            try:
                with open(os.path.join(path, "cgroup.subtree_control")) as handle:
                    enabled = handle.read().split()
            except OSError:
                continue
            if "memory" in enabled and os.access(path, os.W_OK):
                return "v2", path
    return None


def mechanism() -> str:
    """What enforces ``Limits.memory`` for a runsc sandbox started by this process."""
    wanted = os.environ.get(ENV_MEMORY_GUARD, "auto").strip().lower() or "auto"
    if wanted != "watchdog" and _own_cgroup_dir() is not None:
        return "host cgroup"
    return "watchdog"


class MemoryGuard:
    """The memory bound of one sandbox; ``wrap`` its ``runsc run``, ``watch`` it, ``close``."""

    def __init__(self, limit: int | None, kill: Callable[[], None]) -> None:
        self.limit = limit
        self._kill = kill
        self.cgroup: str | None = None
        self.version: str | None = None
        self.how = "none"
        self.tripped = False
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if limit is None:
            return
        if mechanism() == "host cgroup":
            self._make_cgroup(limit)
        if self.cgroup is None:
            self.how = "watchdog"

    def _make_cgroup(self, limit: int) -> None:
        found = _own_cgroup_dir()
        if found is None:
            return
        version, parent = found
        path = os.path.join(parent, f"gvisor-magic-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            if version == "v1":
                _write(path, "memory.limit_in_bytes", str(limit))
                # Keep swap from hiding the overshoot where swap accounting exists.
                with contextlib.suppress(OSError):
                    _write(path, "memory.memsw.limit_in_bytes", str(limit))
            else:
                _write(path, "memory.max", str(limit))
                with contextlib.suppress(OSError):
                    _write(path, "memory.swap.max", "0")
        except OSError as exc:
            log.info("gvisor: cannot make a memory cgroup in %s (%s): using the watchdog",
                     parent, exc)
            with contextlib.suppress(OSError):
                os.rmdir(path)
            return
        self.cgroup, self.version, self.how = path, version, "host cgroup"

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the cgroup (a shell that joins it, then execs).

        Raises ``OSError`` as ``Popen`` would when ``argv[0]`` cannot be executed, so the
        caller's message stays the same with or without the cgroup.
        """
        if self.cgroup is None:
            return argv
        if not os.access(argv[0], os.X_OK):
            raise FileNotFoundError(2, "No such file or directory (or not executable)",
                                    argv[0])
        procs = os.path.join(self.cgroup, "cgroup.procs")
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$0" "$@"', *argv]

    def watch(self, root_pid: int, *, whole_sandbox: bool = True) -> None:
        """Start watching ``root_pid`` and its descendants.

        The watchdog kills the sandbox past the limit. With a cgroup the host kernel
        does the killing, but it picks one process; ``whole_sandbox`` then takes the
        rest down too (a one-shot sandbox whose gofer was chosen would otherwise hang
        until its timeout).
        """
        if self.limit is None:
            return
        if self.how == "watchdog":
            target = self._watch
        elif whole_sandbox:
            target = self._watch_cgroup
        else:
            target = self._watch_stuck
        self._thread = threading.Thread(target=target, args=(root_pid,), daemon=True,
                                        name="gvisor-magic-memory")
        self._thread.start()

    def _watch_cgroup(self, root_pid: int) -> None:
        del root_pid
        while not self._stop.wait(WATCH_INTERVAL):
            if self.oom_kills() > 0:
                self.tripped = True
                with contextlib.suppress(Exception):
                    self._kill()
                return

    def _watch_stuck(self, root_pid: int) -> None:
        """A warm sandbox lives on when the OOM killer ends one command; but if its memory
        stays at the limit ``STUCK_GRACE`` after a kill, it is stuck, and is killed."""
        del root_pid
        seen = self.oom_kills()
        stuck_since = None
        while not self._stop.wait(WATCH_INTERVAL):
            kills = self.oom_kills()
            if kills > seen or stuck_since is not None:
                seen = kills
                if self._usage() < self.limit * 0.95:
                    stuck_since = None
                    continue
                now = time.monotonic()
                stuck_since = stuck_since or now
                if now - stuck_since >= STUCK_GRACE:
                    log.warning("gvisor: the sandbox stayed at its memory limit after an OOM "
                                "kill: killing it")
                    self.tripped = True
                    with contextlib.suppress(Exception):
                        self._kill()
                    return

    def _usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == "v1" else "memory.current"
        try:
            return int(_read(self.cgroup, name).strip())
        except (OSError, ValueError, TypeError):
            return 0

    def _watch(self, root_pid: int) -> None:
        try:
            root = psutil.Process(root_pid)
        except psutil.Error:
            return
        usage = SandboxMemory()
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            used = usage.sample([process.pid for process in processes])
            self.peak = max(self.peak, used)
            if used > self.limit:
                self.tripped = True
                log.warning("gvisor: sandbox memory %d MiB crossed the limit of %d MiB: "
                            "killing it", used >> 20, self.limit >> 20)
                with contextlib.suppress(Exception):
                    self._kill()
                return

    def breached(self) -> bool:
        """Whether the sandbox (or a process in it) was killed for crossing the limit."""
        return self.tripped or self.oom_kills() > 0

    def oom_kills(self) -> int:
        """How many host processes of the sandbox the kernel's OOM killer ended so far.

        With systrap, each address space in the sandbox has a host stub process: the
        OOM killer may end a command's stub (the command dies, the sandbox lives on)
        or the sandbox itself.
        """
        if self.cgroup is None:
            return 0
        return oom_kill_count(os.path.join(
            self.cgroup, "memory.oom_control" if self.version == "v1" else "memory.events"))

    def memory_events(self) -> int:
        """OOM kills plus the watchdog's own kill: what a session compares before and after."""
        return self.oom_kills() + (1 if self.tripped else 0)

    def peak_bytes(self) -> int:
        """The most memory the sandbox held (the cgroup's figure, or the watchdog's samples)."""
        if self.cgroup is not None:
            name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
            with contextlib.suppress(OSError, ValueError):
                return int(_read(self.cgroup, name).strip())
        return self.peak

    def describe_breach(self) -> str:
        size = f"{self.limit / 2**30:g} GiB" if self.limit and self.limit >= 2**30 \
            else f"{(self.limit or 0) >> 20} MiB"
        if self.how == "watchdog":
            return (f"memory limit: the sandbox held more than its limit of {size} at a sample "
                    f"of the watchdog (every {WATCH_INTERVAL:g} s) and was killed")
        return (f"memory limit: the sandbox reached its limit of {size} ({self.how}) and the "
                "process that crossed it was killed")

    def close(self) -> None:
        """Stop watching; remove the cgroup once its processes have gone (its verdict stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.cgroup is not None:
            self.tripped = self.breached()
            self.peak = self.peak_bytes()
            for _ in range(50):
                try:
                    os.rmdir(self.cgroup)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    _kill_members(self.cgroup)
                    threading.Event().wait(0.1)
            else:
                log.warning("gvisor: could not remove the memory cgroup %s", self.cgroup)
            self.cgroup = None


class SandboxMemory:
    """The host memory a runsc sandbox holds, as the watchdog samples it.

    gVisor keeps its processes' pages and its tmpfs in one memory file of the sandbox
    process (a memfd, ``/memfd:runsc-memory``). Those pages are not the resident memory
    of any host process until some process maps them, and systrap's stub processes did
    not show them: seen here (runsc 20240729, 2026-12-07), a command holding 600 MiB
    left the summed RSS of the sandbox's host processes at ~150 MiB, while the memory
    file held 610 MiB. So a sample counts, once each, the allocated blocks of every memfd
    the sandbox's processes hold, plus each process's anonymous resident memory and the
    largest file-backed resident memory of one of them (they all map the same runsc
    binary); their shared memory is the memfds again, and is left out.
    """

    def __init__(self) -> None:
        #: Paths of the memfds found per pid (``/proc/PID/fd/N``); a pid is rescanned
        #: until one is found (the sandbox creates its memory file after it starts).
        self._memfds: dict[int, list[str]] = {}

    def sample(self, pids: list[int]) -> int:
        """Bytes held now by the processes ``pids`` (one sandbox)."""
        anonymous = mapped = 0
        files: dict[tuple[int, int], int] = {}
        for pid in pids:
            own, binary = _resident(pid)
            anonymous, mapped = anonymous + own, max(mapped, binary)
            if not self._memfds.get(pid):
                self._memfds[pid] = _memfds(pid)
            for path in self._memfds[pid]:
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                files[(stat.st_dev, stat.st_ino)] = stat.st_blocks * 512
        return anonymous + mapped + sum(files.values())


def _resident(pid: int) -> tuple[int, int]:
    """(``RssAnon``, ``RssFile``) of one process in bytes (0, 0 when it is gone)."""
    found = {b"RssAnon:": 0, b"RssFile:": 0}
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                name = line[:8]
                if name in found:
                    found[name] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return found[b"RssAnon:"], found[b"RssFile:"]


def _memfds(pid: int) -> list[str]:
    found = []
    base = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(base):
            with contextlib.suppress(OSError):
                if os.readlink(os.path.join(base, fd)).startswith("/memfd:"):
                    found.append(os.path.join(base, fd))
    return found


def oom_kill_count(path: str) -> int:
    """``oom_kill`` (v1 ``memory.oom_control``) or ``oom_kill``/``oom_group_kill`` (v2
    ``memory.events``) of one cgroup; 0 when it cannot be read (gone, another version)."""
    try:
        with open(path) as handle:
            lines = handle.read(65536).splitlines()
        return sum(int(line.split()[1]) for line in lines
                   if line.split()[:1] in (["oom_kill"], ["oom_group_kill"]))
    except (OSError, ValueError, IndexError):
        return 0


def _kill_members(cgroup: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        for pid in _read(cgroup, "cgroup.procs").split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)


def _write(directory: str, name: str, value: str) -> None:
    with open(os.path.join(directory, name), "w") as handle:
        handle.write(value)


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as handle:
        return handle.read(65536)


def remove_orphan_cgroups() -> None:
    """Remove empty cgroups of processes that died without cleaning up (SIGKILL)."""
    found = _own_cgroup_dir()
    if found is None:
        return
    _, parent = found
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            parts = name.split("-")
            if len(parts) == 4 and parts[:2] == ["gvisor", "magic"] and parts[2].isdigit() \
                    and not psutil.pid_exists(int(parts[2])):
                path = os.path.join(parent, name)
                _kill_members(path)
                with contextlib.suppress(OSError):
                    os.rmdir(path)


class ContainerOOMWatch:
    """Counts OOM kills in a Docker container's memory cgroup while it runs.

    Docker's memory cgroup may end only a command's host stub process (the sandbox
    lives on and reports exit 1), and the container and its cgroup are gone by the
    time the client could ask: so the count is sampled while the command runs.
    """

    #: Seconds between samples. The cgroup goes with the container, which a one-shot run
    #: removes as soon as its command ends: at 0.1 s, 1 OOM kill in 13 went unseen
    #: (2026-11-30, runsc 20240729, cgroup v1); one read of a small file costs ~10 µs.
    INTERVAL = 0.01

    def __init__(self, container_id: str) -> None:
        self.paths = [os.path.join(_V1, "docker", container_id, "memory.oom_control"),
                      os.path.join(_V2, "system.slice", f"docker-{container_id}.scope",
                                   "memory.events"),
                      os.path.join(_V2, "docker", container_id, "memory.events")]
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="gvisor-magic-oom")
        self._thread.start()

    def sample(self) -> int:
        """Read the count now (it only grows); return the most seen."""
        for path in self.paths:
            self.kills = max(self.kills, oom_kill_count(path))
        return self.kills

    def _watch(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.sample()

    def close(self) -> int:
        """Stop sampling; the number of OOM kills seen."""
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)
        return self.kills
