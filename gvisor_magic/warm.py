"""A warm sandbox: a running gVisor sandbox whose PID 1 agent runs one command at a time.

``IsolatedSession`` keeps one for its commands; ``WarmPool`` keeps them for one-shot
calls (``run_command_isolated``) that repeat the same sandbox spec. Both get the same
``CommandResult`` from ``WarmSandbox.run``, and both replace a sandbox the moment it says
why it can no longer be trusted (``retired``).

Everything inside the sandbox is untrusted: the agent's frames, its reports and its
silence are bounded and checked in ``agent_channel``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable

from . import registry
from .agent_channel import SETTLE_TIMEOUT, AgentClient, SessionBroken
from .backends.base import Transport
from .changes import start_stamp
from .egress.sandbox import agent_attempts
from .errors import CommandInterrupted, SandboxStartError
from .memory import OOM_RETURNCODE
from .process import Capture, OutputCallback
from .protected import plan_for
from .request import CommandRequest, SandboxSpec, sandbox_env
from .result import KILLED, CommandResult, network_fields
from .sandboxed.agent_wire import CELL_COPY
from .writes import Writes, take_held_writes, with_writes

log = logging.getLogger("gvisor_magic")

#: How long a new sandbox's agent has to say hello.
START_TIMEOUT = 60.0


class WarmSandbox:
    """One running sandbox made to ``spec`` on backend ``backend`` (runsc or docker)."""

    def __init__(self, transport: Transport, client: AgentClient, backend: str,
                 spec: SandboxSpec) -> None:
        self.transport = transport
        self.client = client
        self.backend = backend
        self.spec = spec
        self.started = time.monotonic()
        #: The protected paths its mounts were made for (``ProtectionPlan.key``).
        self.protection: frozenset = spec.plan.key() if spec.plan is not None else frozenset()
        #: Commands it has run.
        self.commands = 0
        #: Set when it must not run another command: why ("" when there is nothing to say).
        self.retired: str | None = None
        #: When it was booted ahead of need (``WarmPool.prepare``), for its first result.
        self.ready_since: float | None = None
        #: A session's held writes by the id of the layer that holds them in the sandbox:
        #: the next commands see them until they are applied or discarded.
        self.layers: dict[int, Writes] = {}
        #: While a command runs: when its writes were last copied out (``start_stamp``),
        #: and the writes of its copies so far (``copy_out_writes``).
        self._copied_at: int | None = None
        self._copies: list[Writes] = []
        self._copying = threading.Lock()

    @classmethod
    def launch(cls, backend: str, spec: SandboxSpec) -> WarmSandbox:
        """Start a sandbox for ``spec`` and wait for its agent; ``SandboxStartError`` if not."""
        spec = dataclasses.replace(spec, plan=plan_for(spec))
        transport: Transport = registry.transport_class(backend)(spec)
        client = AgentClient(transport)
        try:
            ready = client.hello(time.monotonic() + START_TIMEOUT)
        except SessionBroken as exc:
            transport.close()
            raise SandboxStartError(backend, str(exc)) from exc
        except BaseException:  # interrupted (Ctrl-C, a cancelled task) while it started
            transport.close()
            raise
        if not ready:
            transport.close()
            raise SandboxStartError(backend, "the sandbox agent did not say hello within "
                                    f"{START_TIMEOUT:.0f}s: {transport.stderr_text()[-300:]}")
        return cls(transport, client, backend, spec)

    @property
    def sandbox_id(self) -> str:
        return self.transport.sandbox_id

    @property
    def etc_scrubbed(self) -> list[str]:
        """The host /etc files this sandbox shows without their credentials."""
        layout = getattr(self.transport, "layout", None)
        return layout.etc_scrubbed if layout is not None else []

    def retire(self, why: str = "") -> None:
        """Stop the sandbox; ``why`` is what the next command's result should say."""
        if self.retired is None:
            self.retired = why
        self.transport.close()

    close = retire

    def run(self, request: CommandRequest, on_output: OutputCallback | None = None, *,
            fresh: bool = False) -> CommandResult:
        """Run ``request`` in this sandbox, once.

        ``fresh``: the agent empties ``/tmp`` and ``HOME`` after the command, as well as
        killing what it left, so the next command finds nothing of this one.
        Raises ``SandboxStartError`` when the agent never accepted the command (it did not
        run: the caller may run it elsewhere) and ``CommandInterrupted`` on an interrupt.
        """
        if self.retired is not None:
            raise SandboxStartError(self.backend, "the warm sandbox was stopped")
        try:
            tainted = self.client.settle(time.monotonic() + SETTLE_TIMEOUT)
        except SessionBroken as exc:
            self.retire("the previous sandbox failed and was replaced")
            raise SandboxStartError(self.backend, str(exc)) from exc
        if tainted:
            # What the last command did could not be undone: this one gets a fresh sandbox
            # (it was not sent here), and its result says why.
            self.retire(f"the sandbox was replaced (fresh /tmp and HOME): {tainted[:200]}")
            raise SandboxStartError(self.backend, tainted[:200])
        transport = self.transport
        env = sandbox_env(request.env, home=transport.env["HOME"], path=transport.env["PATH"],
                          user=transport.env["USER"])
        if "HOSTNAME" in transport.env:
            env.setdefault("HOSTNAME", transport.env["HOSTNAME"])
        out, err = Capture("stdout", request.max_output), Capture("stderr", request.max_output)
        start = time.monotonic()
        memory_before = transport.memory_events()
        network_mark = transport.network.mark()
        self.commands += 1
        started_ns = self._copied_at = start_stamp()
        self._copies = []
        run = self.client.run(
            {"argv": list(request.argv), "cwd": request.working_dir, "env": env,
             "stdin": request.stdin.hex() if request.stdin else None, "fresh": fresh,
             "keep": self._keep(fresh)},
            out, err, on_output, None if request.timeout is None else start + request.timeout)
        error = memory_note = None
        if run.interrupted and not run.accepted:
            self.retire()  # it may have started: the whole sandbox goes
            raise CommandInterrupted(CommandResult(
                KILLED, "", "", self.backend, True, duration=time.monotonic() - start,
                **network_fields(request.network)))
        if run.broken is not None:
            # Read before the sandbox (and its cgroup) goes: was this its memory limit?
            if transport.memory_events() > memory_before:
                memory_note = transport.memory_note()
            error = f"{memory_note or run.broken}; a fresh sandbox replaces it"
            self.retire("the previous sandbox was killed for crossing its memory limit and "
                        "was replaced (fresh /tmp and HOME)" if memory_note else
                        "the previous sandbox failed and was replaced")
            if not run.accepted:
                # The request never reached a working agent: safe to say it did not run.
                raise SandboxStartError(self.backend, str(run.broken)) from run.broken
        elif run.lost:
            self.retire()  # interrupted again while the agent was killing the command
        if run.failure is not None:
            raise run.failure  # the output callback's own error, its command killed
        if memory_note is None and transport.memory_events() > memory_before:
            # The OOM killer ended the command's process; the sandbox lives on.
            memory_note = error = transport.memory_note()
        returncode = OOM_RETURNCODE if memory_note else run.returncode(failed=bool(error))
        blocked = transport.network.blocked(
            network_mark, agent_attempts((run.status or {}).get("blocked")))
        result = CommandResult.from_streams(
            out, err, returncode=returncode, backend=self.backend, isolated=True,
            timed_out=run.timed_out, duration=time.monotonic() - start,
            network=request.network, error=error, blocked=blocked,
            details={"memory_limit": memory_note} if memory_note else {})
        if self.spec.holds_writes and run.accepted:
            with self._copying:  # after a copy asked while it ran, if one is being taken
                writes = self._writes(run, self._copied_at or started_ns,
                                      error or memory_note)
                _discard_superseded(writes, self._copies)
                self._copied_at, self._copies = None, []
            if not fresh:
                self._supersede(writes, (run.status or {}).get("layer_id"))
            result = with_writes(result, writes)
        if run.status is not None and run.status.get("tainted"):
            # The agent could not undo what this command changed: the next command gets a
            # fresh sandbox, and its result says why.
            self.retire(f"the sandbox was replaced (fresh /tmp and HOME): "
                        f"{str(run.status['tainted'])[:200]}")
        if run.interrupted:
            raise CommandInterrupted(result, (
                "command interrupted; its processes were killed and the warm sandbox was kept"
                if self.retired is None else
                "command interrupted; its sandbox was killed (the next command starts a "
                "fresh one)"))
        return result


    def _keep(self, fresh: bool) -> list[list[object]]:
        """The layers of earlier commands the next one sees (newest first), each with the
        paths applied or discarded since, which the agent takes out of it: a session's held
        changes. None for a pool's call (``fresh``), which sees only the host's files."""
        if fresh:
            self.layers.clear()
            return []
        keep: list[list[object]] = []
        for number in sorted(self.layers, reverse=True):
            writes = self.layers[number]
            if not writes.held() or len(keep) >= MAX_KEPT_LAYERS:
                # Nothing left to see, or too deep a stack: the changes stay held on the
                # host (result.apply still works), the sandbox no longer shows them.
                del self.layers[number]
                continue
            keep.append([number, [c.path for c in writes.changes if c.applied is not None]])
        return keep

    def _supersede(self, writes: Writes, number: object) -> None:
        """A session's command saw the held changes of earlier ones: those it wrote over or
        deleted are discarded (the newest is what the session holds now)."""
        _discard_superseded(writes, self.layers.values())
        if isinstance(number, int) and writes.held():
            self.layers[number] = writes

    def copy_out_writes(self, timeout: float = 60.0) -> Writes | None:
        """The writes of the running command since it started or since the last call, taken
        now (judged and, in auto, the inert ones applied) while it goes on running: a gVisor
        kernel's cell has ended. None when no command runs or its writes are not held.

        Its later writes over or deletions of a path held by an earlier copy supersede it
        (the earlier one is discarded). Something the command is still writing as this runs
        is taken as it stands then; the next copy has the rest.
        """
        if not self.spec.holds_writes or not self.client.running:
            return None
        with self._copying:
            started_ns = self._copied_at
            if started_ns is None:
                return None
            answer = self.client.copy_out(timeout)
            if answer.get("layer") != "done":
                return Writes(self.spec.writes_mode, None, None, lost=(
                    f"its writes could not be copied out of the sandbox "
                    f"({str(answer.get('layer'))[:200]}): none reached the working dir yet"))
            self._copied_at = start_stamp()
            if answer.get("empty") is True:
                return Writes(self.spec.writes_mode, None, None)  # nothing changed since
            writes = take_held_writes(self.spec, os.path.join(self.transport.status_dir,
                                                              CELL_COPY),
                                      started_ns, completed=True,
                                      store_base=os.path.dirname(
                                          os.path.dirname(self.transport.status_dir)))
            _discard_superseded(writes, self._copies)
            if writes.held():
                self._copies.append(writes)
            return writes

    def _writes(self, run, started_ns: int, failed: str | None) -> Writes:
        """The command's held writes, as the agent's layer keeper copied them out."""
        layer = (run.status or {}).get("layer")
        if layer != "done":
            return Writes(self.spec.writes_mode, None, None, lost=(
                f"its writes were not copied out of the sandbox ({str(layer)[:200]})"
                if layer else "the sandbox ended before its writes were copied out")
                + ": none reached the working dir")
        completed = not (failed or run.timed_out or run.interrupted or run.status.get("killed")
                         or "signal" in run.status)
        return take_held_writes(self.spec, self.transport.status_dir, started_ns,
                                completed=completed)


def _discard_superseded(writes: Writes, earlier: Iterable[Writes]) -> None:
    """Held changes of ``earlier`` writes that ``writes`` wrote over or deleted (a path, or
    one below a directory it deleted or made opaque) are discarded: the newest is what the
    sandbox shows and what is held now (a session's commands, a kernel's cells)."""
    if writes.changeset is None:
        return
    cs = writes.changeset
    gone = set(cs.markers.listed_deletions()) if cs.markers is not None else set()
    touched = {c.path for c in cs} | gone
    hidden = tuple(p + "/" for p in cs.opaque | gone)
    for older in earlier:
        stale = [c.path for c in older.held()
                 if c.path in touched or c.path.startswith(hidden)]
        if stale:
            older.discard(stale)


def _key(backend: str, spec: SandboxSpec) -> tuple[str, SandboxSpec]:
    """What a pooled sandbox is made of: its backend and spec (not the plan of its mounts,
    which is looked at again when it is handed out)."""
    return backend, dataclasses.replace(spec, plan=None)


#: At most this many earlier layers under a session's command (overlay lower layers).
MAX_KEPT_LAYERS = 64


@dataclasses.dataclass
class _Idle:
    sandbox: WarmSandbox
    since: float


class WarmPool:
    """Warm sandboxes that repeated one-shot calls reuse, keyed by everything a sandbox is
    made of (backend and ``SandboxSpec``: working dir, repo, network, limits, protected
    paths, shell).

    A call takes an idle sandbox of its key, or, when its key was used within
    ``idle_timeout``, starts one (the first call of a key runs in a fresh sandbox as
    before). Each call gets its own environment, and after it the agent kills everything
    the command left and empties ``/tmp`` and ``HOME`` (``fresh``). A sandbox idle for
    ``idle_timeout`` seconds is stopped; at most ``max_sandboxes`` run at once, booting
    ones included (further calls start fresh sandboxes). A sandbox that failed, was tainted
    or was interrupted mid-start is never handed out again.

    Ready sandboxes (``ready``, on by default): once a key's first call has ended, and
    when a session takes one (``adopt``), ``prepare`` boots one more of that key in the
    background, so the next call or session finds it booted. A call that comes while it
    boots waits for it rather than starting another. It counts against ``max_sandboxes``
    and stops when idle as any other; ``close`` (at exit too) waits for those booting and
    stops them.
    """

    def __init__(self, idle_timeout: float = 30.0, max_sandboxes: int = 4,
                 ready: bool = True) -> None:
        self.idle_timeout = idle_timeout
        self.max_sandboxes = max_sandboxes
        #: Boot a sandbox ahead of need after a key's first call (``prepare``).
        self.ready = ready
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, SandboxSpec], list[_Idle]] = {}
        self._busy = 0
        self._last_use: dict[tuple[str, SandboxSpec], float] = {}
        self._timer: threading.Timer | None = None
        #: Keys whose ready sandbox is booting, and the thread booting it.
        self._preparing: dict[tuple[str, SandboxSpec], threading.Thread] = {}
        self._generation = 0  # a close while one boots: it is stopped, never kept
        self.closed = False

    def live(self) -> int:
        """Sandboxes this pool runs now (idle and in use)."""
        with self._lock:
            return self._live_locked()

    def take(self, backend: str, spec: SandboxSpec) -> WarmSandbox | None:
        """A warm sandbox for ``spec`` (started now if its key is in use), or None: run the
        call in a fresh sandbox. Give it back with ``give_back``."""
        key = _key(backend, spec)
        now = time.monotonic()
        with self._lock:
            if self.closed:
                return None
            expired = self._expire_locked(now)
            recent = now - self._last_use.get(key, -1e9) < self.idle_timeout
            self._last_use[key] = now
            found = self._pop_idle_locked(key)
            booting = self._preparing.get(key) if found is None else None
            launch = (found is None and booting is None and recent
                      and self._live_locked() < self.max_sandboxes)
            if found is not None or launch:
                self._busy += 1
        for sandbox in expired:
            sandbox.retire()
        if booting is not None:
            booting.join(START_TIMEOUT)  # nearer to ready than one started now
            with self._lock:
                found = None if self.closed else self._pop_idle_locked(key)
                if found is not None:
                    self._busy += 1
            return found
        if found is not None or not launch:
            return found
        try:
            sandbox = WarmSandbox.launch(backend, spec)
        except SandboxStartError as exc:
            # A fresh one-shot sandbox is tried next: it says what failed, if anything does.
            log.info("gvisor: no warm sandbox to reuse (%s); running in a fresh one", exc.reason)
            with self._lock:
                self._busy -= 1
            return None
        log.debug("gvisor: started warm sandbox %s for repeated one-shot calls",
                  sandbox.sandbox_id)
        return sandbox

    def prepare(self, backend: str, spec: SandboxSpec) -> None:
        """Boot a sandbox of ``spec`` in the background for the next call or session, unless
        one is idle or booting already, the pool is full, or ``ready`` is off."""
        key = _key(backend, spec)
        with self._lock:
            if (self.closed or not self.ready or key in self._preparing or self._idle.get(key)
                    or self._live_locked() >= self.max_sandboxes):
                return
            self._busy += 1  # counted while it boots
            self._last_use[key] = time.monotonic()
            thread = threading.Thread(target=self._boot, args=(key, self._generation),
                                      daemon=True, name="gvisor-magic-ready")
            self._preparing[key] = thread
        thread.start()

    def _boot(self, key: tuple[str, SandboxSpec], generation: int) -> None:
        backend, spec = key
        sandbox = None
        try:
            sandbox = WarmSandbox.launch(backend, spec)
        except SandboxStartError as exc:
            log.info("gvisor: no sandbox ready ahead of need (%s)", exc.reason)
        except Exception:  # never let a background boot die with a traceback
            log.exception("gvisor: booting a sandbox ahead of need failed")
        with self._lock:
            self._busy -= 1
            keep = sandbox is not None and not self.closed and generation == self._generation
            if keep:
                assert sandbox is not None
                sandbox.ready_since = time.monotonic()
                self._idle.setdefault(key, []).append(_Idle(sandbox, sandbox.ready_since))
                self._arm_locked()
            self._preparing.pop(key, None)
        if sandbox is not None and not keep:
            sandbox.close()

    def adopt(self, backend: str, spec: SandboxSpec) -> WarmSandbox | None:
        """An idle sandbox of ``spec`` for a session, which owns it from now on (it leaves
        the pool, which prepares another), or None: the session starts its own."""
        key = _key(backend, spec)
        with self._lock:
            if self.closed:
                return None
            expired = self._expire_locked(time.monotonic())
            found = self._pop_idle_locked(key)
        for sandbox in expired:
            sandbox.retire()
        if found is not None and found.transport.alive():
            self.prepare(backend, spec)
            return found
        if found is not None:
            found.close()
        return None

    def _pop_idle_locked(self, key: tuple[str, SandboxSpec]) -> WarmSandbox | None:
        idle = self._idle.get(key)
        found = idle.pop().sandbox if idle else None
        if idle == []:
            del self._idle[key]
        return found

    def give_back(self, sandbox: WarmSandbox) -> None:
        """Keep ``sandbox`` for the next call of its key, unless it is retired or dead."""
        key = _key(sandbox.backend, sandbox.spec)
        with self._lock:
            self._busy -= 1
            if sandbox.retired is None and not self.closed and sandbox.transport.alive():
                self._idle.setdefault(key, []).append(_Idle(sandbox, time.monotonic()))
                self._arm_locked()
                return
        sandbox.close()

    def close(self) -> None:
        """Stop every idle sandbox (busy ones stop when their call gives them back), and
        wait for those booting ahead of need, which stop too."""
        with self._lock:
            self.closed = True
            self._generation += 1
            idle = [entry.sandbox for entries in self._idle.values() for entry in entries]
            self._idle.clear()
            self._last_use.clear()
            booting = list(self._preparing.values())
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for sandbox in idle:
            sandbox.close()
        for thread in booting:
            if thread is not threading.current_thread():
                thread.join(START_TIMEOUT)

    def reset(self) -> None:
        """Stop every idle sandbox and forget every key; the pool stays usable."""
        self.close()
        with self._lock:
            self.closed = False

    def _live_locked(self) -> int:
        return self._busy + sum(len(entries) for entries in self._idle.values())

    def _expire_locked(self, now: float) -> list[WarmSandbox]:
        """Take out what has been idle too long (the caller stops it, outside the lock)."""
        expired = []
        for key in list(self._idle):
            keep = [e for e in self._idle[key] if now - e.since < self.idle_timeout]
            expired += [e.sandbox for e in self._idle[key] if now - e.since >= self.idle_timeout]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        for key, used in list(self._last_use.items()):
            if now - used >= self.idle_timeout:
                del self._last_use[key]
        return expired

    def _arm_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        oldest = min((e.since for entries in self._idle.values() for e in entries), default=None)
        if oldest is None:
            return
        wait = max(0.05, oldest + self.idle_timeout - time.monotonic())
        self._timer = threading.Timer(wait, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        with self._lock:
            expired = self._expire_locked(time.monotonic())
            self._arm_locked()
        for sandbox in expired:
            log.debug("gvisor: stopping warm sandbox %s after %gs idle", sandbox.sandbox_id,
                      self.idle_timeout)
            sandbox.retire()


POOL = WarmPool()


@atexit.register
def _close_pool() -> None:
    with contextlib.suppress(Exception):  # interpreter exit: best effort, no traceback
        POOL.close()
