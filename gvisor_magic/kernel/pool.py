""""Python 3 (gVisor)" kernels started ahead of need, in the Jupyter server.

A kernel's start is mostly its sandbox's boot and ipykernel's imports inside gVisor (about
2 s on 2 cores, against 0.5 s for a normal ipykernel). After a kernel of a given *recipe*
started, the provisioner asks this pool to keep ``pool`` more of that recipe started (one
by default): the launcher runs, its sandbox is up, and the kernel has started on a
connection file the pool wrote (IPC sockets in its private dir, a key of its own) and made
its sockets. It is ready; all it cannot know in advance is who claims it.

The recipe is everything a fresh kernel is made of, so a pooled kernel is never handed to
a start that a fresh kernel would have made differently: the sandbox's settings (network,
limits, protected paths, writes, any named setting), the working dir, the kernelspec's
command and the environment the server gives the launcher. Only what belongs to one kernel
is given at the claim (``PooledKernel.claim``): its id, to the launcher (``gvisor-magic
held --kernel ID`` names it by that), and its ``JPY_SESSION_NAME`` (the notebook), to the
kernel, which sets ``__session__``. The provisioner then hands the server the pooled
kernel's connection, which the manager takes in place of the one it wrote
(``KernelManager._reconcile_connection_info``) and talks to it as to a kernel it started.

A pooled kernel is shut down when nothing claimed it for ``IDLE`` seconds, when another
recipe needs its place (at most ``MAX_POOLED`` in all), when it is replaced by a kernel of
the same recipe that died, and when the server exits. It also ends on its own when the
server dies (the launcher watches its parent) and, since it holds the read end of its
claim pipe, when the pool closes that pipe. What its launcher leaves, if it is killed, is
removed by ``run_dirs.remove_run_dirs_of`` as for any kernel.

How Jupyter Kernel Gateway and Enterprise Gateway do the same: Kernel Gateway pre-spawns
``prespawn_count`` kernels of one kernelspec at start; Enterprise Gateway's pools and
agent-sandbox's warm pools keep N per template. Here the template is the recipe, learnt
from the first start, since a kernel's working dir is part of its sandbox (a gVisor
sandbox cannot be given a new mount once it runs).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from ..request import SandboxSpec
from ..run_dirs import make_kernel_dir, remove_run_dirs_of
from .launch import CLAIM_SOCKET
from .starting import START_TIMEOUT, launcher_cmd, wait_for_start, write_spec

log = logging.getLogger("gvisor_magic")

#: Seconds a pooled kernel waits for a claim before it is shut down.
IDLE = 600.0
#: At most this many pooled kernels at once in a server, all recipes together.
MAX_POOLED = 4
#: A recipe whose pooled kernel failed to start is not tried again for this long (seconds).
RETRY_AFTER = 60.0
#: The variables of the server's environment that belong to one kernel, not to its recipe:
#: given at the claim (the launcher passes only ``JPY_SESSION_NAME`` into the sandbox).
PER_KERNEL_ENV = ("JPY_SESSION_NAME",)
#: How long a claimed kernel may take to take its claim (seconds); it makes the socket for
#: it before its sockets, so a ready one answers at once.
CLAIM_TIMEOUT = 120.0
#: Stands for the kernel's connection file in ``Recipe.kernel_cmd``.
CONNECTION_FILE = "{connection_file}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a "Python 3 (gVisor)" kernel is made of, but for what belongs to one kernel."""

    spec: SandboxSpec  # the sandbox, with no kernel dir yet
    argv: tuple[str, ...]  # the kernelspec's command and extra arguments, as written
    env: tuple[tuple[str, str], ...]  # the launcher's environment, sorted, less PER_KERNEL_ENV
    state_base: str | None  # where the launcher makes its sandbox's run dirs
    #: ``argv`` as Jupyter formatted it for a start, ``CONNECTION_FILE`` in place of the
    #: connection file (not part of the key: it follows from the rest).
    kernel_cmd: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @classmethod
    def of(cls, spec: SandboxSpec, argv: Sequence[str], env: Mapping[str, str],
           state_base: str | None) -> Recipe:
        return cls(dataclasses.replace(spec, kernel_dir=None), tuple(argv),
                   tuple(sorted((k, v) for k, v in env.items() if k not in PER_KERNEL_ENV)),
                   state_base)


@dataclasses.dataclass
class PooledKernel:
    """A launcher whose sandbox runs and whose kernel waits for its claim."""

    recipe: Recipe
    sockets_dir: str
    process: subprocess.Popen
    claim_fd: int  # the write end of the pipe the launcher reads its claim from
    since: float
    #: The kernel's connection (its sockets in ``sockets_dir``, its own key), which the
    #: provisioner hands to the server in place of the one it made.
    connection_info: dict

    def claim(self, kernel_id: str | None, env: Mapping[str, str],
              timeout: float = CLAIM_TIMEOUT) -> str | None:
        """Make it the kernel ``kernel_id``: the launcher names its held writes by that id,
        and the kernel takes its per-kernel environment (``JPY_SESSION_NAME``) and says so.
        None once done; else why not (the caller shuts it down and starts a fresh one)."""
        fd, self.claim_fd = self.claim_fd, -1
        try:
            if self.process.poll() is not None:
                return f"its launcher had ended (status {self.process.returncode})"
            os.write(fd, json.dumps({"kernel_id": kernel_id}).encode() + b"\n")
        except OSError as exc:
            return f"its launcher did not take the claim ({exc})"
        finally:
            os.close(fd)
        mine = {k: v for k, v in env.items() if k in PER_KERNEL_ENV}
        path = os.path.join(self.sockets_dir, CLAIM_SOCKET)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                conn.connect(path)  # made by the kernel as it starts: retried until then
                conn.sendall(json.dumps(mine).encode() + b"\n")
                answer = conn.recv(16)
                return None if answer == b"ok\n" else f"the kernel answered {answer!r}"
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.01)
            except OSError as exc:
                return f"the kernel did not take its claim ({exc})"
            finally:
                conn.close()
        return (f"the kernel did not take its claim within {timeout:.0f} s"
                if self.process.poll() is None else "its launcher ended")

    def shut_down(self, wait: float = 30.0) -> None:
        """End it (the launcher stops its kernel and sandbox when its claim pipe closes)
        and remove what it leaves."""
        if self.claim_fd >= 0:
            fd, self.claim_fd = self.claim_fd, -1
            os.close(fd)
        try:
            self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            log.warning("gvisor: pooled kernel %s did not stop in %.0f s; killed",
                        self.process.pid, wait)
            self.process.kill()
            self.process.wait()
        if self.recipe.state_base:
            remove_run_dirs_of(self.process.pid, self.recipe.state_base)
        shutil.rmtree(self.sockets_dir, ignore_errors=True)


class KernelPool:
    """The server's pooled kernels by recipe (see the top)."""

    def __init__(self, idle: float = IDLE, max_pooled: int = MAX_POOLED) -> None:
        self.idle = idle
        self.max_pooled = max_pooled
        self._lock = threading.Lock()
        #: Notified when a start ends (``take`` may be waiting for it).
        self._changed = threading.Condition(self._lock)
        self._ready: dict[Recipe, list[PooledKernel]] = {}
        self._starting: dict[Recipe, int] = {}
        self._failed: dict[Recipe, float] = {}
        self._threads: set[threading.Thread] = set()
        self._timer: threading.Timer | None = None
        self.closed = False

    def take(self, recipe: Recipe, wait: float = 0.0) -> PooledKernel | None:
        """A pooled kernel of ``recipe`` whose launcher runs, or None (start a fresh one).
        With ``wait``, one still starting for ``recipe`` is waited for that many seconds at
        most: it is nearer to ready than a kernel started now."""
        stale = []
        found = None
        deadline = time.monotonic() + wait
        with self._changed:
            while (not self._ready.get(recipe) and self._starting.get(recipe)
                   and not self.closed and time.monotonic() < deadline):
                self._changed.wait(max(0.0, deadline - time.monotonic()))
            entries = self._ready.get(recipe, [])
            while entries and found is None:
                entry = entries.pop(0)
                if entry.process.poll() is None:
                    found = entry
                else:
                    stale.append(entry)
            if not entries:
                self._ready.pop(recipe, None)
        for entry in stale:
            log.info("gvisor: pooled kernel %s had ended (status %s)", entry.process.pid,
                     entry.process.returncode)
            entry.shut_down()
        return found

    def fill(self, recipe: Recipe, size: int) -> None:
        """Start pooled kernels of ``recipe`` in the background until ``size`` are ready or
        starting (making room among other recipes' if needed)."""
        evicted: list[PooledKernel] = []
        starts = 0
        with self._lock:
            if self.closed or size <= 0:
                return
            if time.monotonic() - self._failed.get(recipe, -1e9) < RETRY_AFTER:
                return
            have = len(self._ready.get(recipe, ())) + self._starting.get(recipe, 0)
            starts = max(0, min(size, self.max_pooled) - have)
            while starts and self._count_locked() + starts > self.max_pooled:
                victim = self._oldest_other_locked(recipe)
                if victim is None:
                    starts = max(0, self.max_pooled - self._count_locked())
                    break
                evicted.append(victim)
            if starts:
                self._starting[recipe] = self._starting.get(recipe, 0) + starts
        for entry in evicted:
            threading.Thread(target=entry.shut_down, daemon=True,
                             name="gvisor-magic-pool-stop").start()
        for _ in range(starts):
            thread = threading.Thread(target=self._start, args=(recipe,), daemon=True,
                                      name="gvisor-magic-pool-start")
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _count_locked(self) -> int:
        return sum(map(len, self._ready.values())) + sum(self._starting.values())

    def _oldest_other_locked(self, recipe: Recipe) -> PooledKernel | None:
        others = [(entry.since, key) for key, entries in self._ready.items()
                  if key != recipe for entry in entries]
        if not others:
            return None
        _, key = min(others, key=lambda pair: pair[0])
        entry = self._ready[key].pop(0)
        if not self._ready[key]:
            del self._ready[key]
        return entry

    def _start(self, recipe: Recipe) -> None:
        entry = None
        try:
            entry = start_pooled(recipe)
        except Exception as exc:  # a background start never dies with a traceback
            log.warning("gvisor: no kernel could be started ahead of need (%s)", exc)
        with self._lock:
            self._threads.discard(threading.current_thread())
            self._starting[recipe] -= 1
            if not self._starting[recipe]:
                del self._starting[recipe]
            keep = entry is not None and not self.closed
            if keep:
                assert entry is not None
                self._ready.setdefault(recipe, []).append(entry)
                self._arm_locked()
            elif entry is None:
                self._failed[recipe] = time.monotonic()
            self._changed.notify_all()
        if entry is not None and not keep:
            entry.shut_down()

    def _arm_locked(self) -> None:
        if self._timer is None and not self.closed:
            self._timer = threading.Timer(self.idle / 4, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._timer = None
            expired = [e for entries in self._ready.values() for e in entries
                       if now - e.since >= self.idle]
            for key in list(self._ready):
                self._ready[key] = [e for e in self._ready[key] if e not in expired]
                if not self._ready[key]:
                    del self._ready[key]
            if self._ready:
                self._arm_locked()
        for entry in expired:
            log.info("gvisor: pooled kernel %s unclaimed for %.0f s: shut down",
                     entry.process.pid, self.idle)
            entry.shut_down()

    def ready(self) -> list[PooledKernel]:
        """The pooled kernels that wait for a claim now."""
        with self._lock:
            return [e for entries in self._ready.values() for e in entries]

    def starting(self) -> int:
        with self._lock:
            return sum(self._starting.values())

    def close(self, wait: float = 200.0) -> None:
        """Shut down every pooled kernel, and wait (at most ``wait`` seconds) for those
        still starting, which shut down once started."""
        with self._lock:
            self.closed = True
            self._changed.notify_all()
            entries = [e for entries in self._ready.values() for e in entries]
            self._ready.clear()
            threads = list(self._threads)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for entry in entries:
            entry.shut_down()
        deadline = time.monotonic() + min(wait, START_TIMEOUT + 20)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def reset(self) -> None:
        """``close``, and usable again."""
        self.close()
        with self._lock:
            self.closed = False
            self._failed.clear()


def start_pooled(recipe: Recipe) -> PooledKernel | None:
    """Start one kernel of ``recipe`` and wait until it is ready (its sandbox runs and it
    has made its sockets); None if it could not (the reason is logged)."""
    if not recipe.kernel_cmd:
        raise ValueError("the recipe has no formatted kernel command")
    from jupyter_client.connect import write_connection_file
    from jupyter_client.launcher import launch_kernel

    sockets_dir = make_kernel_dir()
    inside = os.path.join(sockets_dir, "connection.json")
    # Its own connection: IPC sockets in its private dir, a key of its own (mode 0600).
    _, connection = write_connection_file(inside, transport="ipc",
                                          ip=os.path.join(sockets_dir, "k"),
                                          key=secrets.token_hex(32).encode())
    if isinstance(connection.get("key"), str):
        connection["key"] = connection["key"].encode()  # as a manager's own info has it
    spec = dataclasses.replace(recipe.spec, kernel_dir=sockets_dir)
    spec_file = write_spec(spec, None)
    ready_read, ready_write = os.pipe()
    claim_read, claim_write = os.pipe()
    kernel_cmd = [inside if arg == CONNECTION_FILE else arg for arg in recipe.kernel_cmd]
    process = None
    try:
        process = launch_kernel(
            launcher_cmd(spec_file, ready_write, None, kernel_cmd, claim_fd=claim_read),
            env=dict(recipe.env), cwd=spec.working_dir, pass_fds=(ready_write, claim_read))
        os.close(ready_write)
        os.close(claim_read)
        ready_write = claim_read = -1
        why = wait_for_start(ready_read, process)
    except BaseException:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        os.close(claim_write)
        shutil.rmtree(sockets_dir, ignore_errors=True)
        raise
    finally:
        for fd in (ready_read, ready_write, claim_read):
            if fd >= 0:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spec_file)
    if why is None:
        why = _wait_for_sockets(connection, process)
    if why is None:
        log.info("gvisor: a kernel was started ahead of need (launcher %s, %s)",
                 process.pid, spec.working_dir)
        return PooledKernel(recipe, sockets_dir, process, claim_write, time.monotonic(),
                            connection)
    log.warning("gvisor: a kernel started ahead of need did not start: %s", why)
    entry = PooledKernel(recipe, sockets_dir, process, claim_write, time.monotonic(),
                         connection)
    entry.shut_down(wait=5.0)
    return None


def _wait_for_sockets(connection: Mapping, process: subprocess.Popen,
                      timeout: float = CLAIM_TIMEOUT) -> str | None:
    """Wait until the kernel has made its five sockets (ipykernel binds them once its
    imports are done): then it is ready, and a claim costs no start. None, or why not."""
    paths = [f"{connection['ip']}-{connection[name]}" for name in
             ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(path) for path in paths):
        if process.poll() is not None:
            return f"its launcher exited with status {process.returncode}"
        if time.monotonic() > deadline:
            return f"its kernel did not make its sockets within {timeout:.0f} s"
        time.sleep(0.02)
    return None


#: The server's pool.
POOL = KernelPool()
atexit.register(POOL.close)
