"""``IsolatedSession``: one warm sandbox, many commands, milliseconds each.

A fresh gVisor sandbox costs a few hundred milliseconds to start and stop; a
session starts one, with a small agent as its PID 1 (``sandboxed/session_agent.py``),
and sends it each command. Everything inside the sandbox is untrusted: any
malformed, oversized or unexpected frame, a silent agent or a dead sandbox
ends the session with a clear error in that command's result (never a hang,
never a crash, never a re-run), and the next ``run`` starts a fresh sandbox.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import EllipsisType

from . import registry
from .changes import Change
from .errors import CommandInterrupted, IsolationUnavailable, SandboxStartError
from .postrun import epilogue
from .process import OutputCallback
from .protected import PathPolicy, ProtectionPlan, plan_for
from .request import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    CommandRequest,
    Limits,
    NetworkSetting,
    SandboxSpec,
    check_max_output,
    resolve_mode,
    resolve_require_isolation,
    resolve_spec,
)
from .result import CommandResult
from .runner import check_mode_can_isolate, isolation_required, plan, ready_note, run_fresh
from .warm import POOL, WarmSandbox
from .writes import HeldChanges, Writes

_SESSIONS: weakref.WeakSet = weakref.WeakSet()


class IsolatedSession:
    """A warm sandbox for many commands: ``with IsolatedSession() as s: s.run("ls")``.

    Files in the sandbox's private ``/tmp`` and ``HOME`` persist between the
    commands of one session; cwd and env are per command. ``mode`` and
    ``require_isolation`` follow ``run_command_isolated``; a session falls back
    to ``subprocess`` only when no gVisor sandbox can start (and never when
    isolation is required).
    """

    def __init__(self, spec: SandboxSpec | str | os.PathLike[str] | None = None,
                 repo_path: str | os.PathLike[str] | None = None, *, mode: str | None = None,
                 require_isolation: bool | None = None,
                 max_output: int | None = DEFAULT_MAX_OUTPUT,
                 idle_timeout: float | None = None,
                 working_dir: str | os.PathLike[str] | None = None,
                 network: NetworkSetting | None = None, limits: Limits | None = None,
                 shell: str | None = None,
                 protected_paths: Sequence[str] | PathPolicy | None = None,
                 writes: str | None = None) -> None:
        """``spec`` is the sandbox (``SandboxSpec.from_options({...})``); its settings may
        instead be given one by one, as for ``run_command_isolated``. Without a working
        dir, the current directory."""
        #: What the sandbox is made of: a new spec needs a new sandbox.
        self.spec = resolve_spec(spec, {
            "working_dir": working_dir, "repo_path": repo_path, "network": network,
            "limits": limits, "shell": shell, "protected_paths": protected_paths,
            "writes": writes}, default_working_dir=os.getcwd())
        #: Bytes kept per stream when ``run`` is not told otherwise (the host's business).
        self.max_output = check_max_output(max_output)
        self.mode = resolve_mode(mode)
        self.require_isolation = resolve_require_isolation(require_isolation)
        check_mode_can_isolate(self.mode, self.require_isolation, self.spec.network)
        self.idle_timeout = idle_timeout
        self._warm: WarmSandbox | None = None
        self._lock = threading.RLock()
        self._idle_timer: threading.Timer | None = None
        self._note: str | None = None  # told to the next result (e.g. a restart)
        self._ready: str | None = None  # the sandbox was booted ahead of need: how long ago
        #: Why commands run one-shot instead of in a warm sandbox (None while warm).
        self.cold_reason: str | None = None
        self.backend: str | None = None
        self.closed = False
        #: The writes its commands left held for review (``changes``, ``apply``).
        self.held = HeldChanges()
        self._starting = False
        _SESSIONS.add(self)

    @classmethod
    def for_spec(cls, spec: SandboxSpec, *, mode: str | None = None,
                 require_isolation: bool | None = None,
                 max_output: int | None = DEFAULT_MAX_OUTPUT,
                 idle_timeout: float | None = None) -> IsolatedSession:
        """``IsolatedSession(spec, ...)``, for callers that say so."""
        return cls(spec, mode=mode, require_isolation=require_isolation,
                   max_output=max_output, idle_timeout=idle_timeout)

    # -- state ------------------------------------------------------------------

    @property
    def sandbox_id(self) -> str | None:
        warm = self._warm
        return warm.sandbox_id if warm is not None else None

    @property
    def state(self) -> str:
        if self.closed:
            return "closed"
        if self._warm is not None:
            return "warm"
        if self._starting:
            return "starting"
        return "one-shot" if self.cold_reason else "stopped"

    def __enter__(self) -> IsolatedSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the sandbox now rather than at the first ``run`` (e.g. in the background)."""
        with self._lock:
            if self.closed:
                raise RuntimeError("this IsolatedSession is closed")
            if self._warm is None and self.cold_reason is None:
                self._start_locked()

    def _start_locked(self) -> None:
        """Start a warm runsc sandbox, or decide to run commands one-shot, and say why.

        Only runsc keeps a sandbox warm; everything else (Docker, the host) runs
        each command through ``run_command_isolated``, whose results say where.
        """
        if self.mode != "auto" and not registry.isolates(self.mode):
            self.cold_reason = f"mode {self.mode!r}: commands run on the host, one by one"
            return
        require = isolation_required(self.require_isolation, self.spec.network)
        names = [name for name in plan(self.mode, require)[0]
                 if registry.transport_class(name) is not None]
        reasons: dict[str, str] = {}
        self._starting = True
        try:
            for name in names:
                ready = POOL.adopt(name, self.spec)  # one booted ahead of need, if any
                if ready is not None:
                    self._warm, self.backend, self.cold_reason = ready, name, None
                    self._ready = ready_note(ready)  # said by the first result
                    return
                try:
                    self._warm = WarmSandbox.launch(name, self.spec)
                    self.backend, self.cold_reason = name, None
                    return
                except SandboxStartError as exc:
                    reasons[name] = exc.reason + (f" (fix: {exc.fix})" if exc.fix else "")
        finally:
            self._starting = False
        if self.mode != "auto":
            raise IsolationUnavailable(f"cannot start a warm {self.mode} sandbox", reasons)
        self.cold_reason = "no warm sandbox: " + "; ".join(f"{k}: {v}" for k, v in
                                                           reasons.items())

    def close(self) -> None:
        """Stop the sandbox; idempotent, and also done at interpreter exit."""
        with self._lock:
            self.closed = True
            self._stop_locked()

    def restart(self) -> None:
        """Replace the sandbox (fresh /tmp and HOME) and try runsc again."""
        with self._lock:
            self._stop_locked()
            self.backend, self.cold_reason = None, None

    def _stop_locked(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()

    def _arm_idle_timer(self) -> None:
        if self.idle_timeout is None:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = threading.Timer(self.idle_timeout, self._idle_stop)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _idle_stop(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                if self._warm is not None:
                    self._stop_locked()
                    self._note = (f"the sandbox was stopped after {self.idle_timeout:g}s idle; "
                                  "this command runs in a new one (/tmp and HOME start empty)")
            finally:
                self._lock.release()

    def note_for_next_result(self, text: str) -> None:
        """Say ``text`` in the next command's ``details["session_note"]`` (and warnings)."""
        with self._lock:
            self._note = f"{self._note}; {text}" if self._note else text

    # -- running ----------------------------------------------------------------------

    def run(self, command: str | Sequence[str], *, timeout: float | None = DEFAULT_TIMEOUT,
            env: Mapping[str, str] | None = None, on_output: OutputCallback | None = None,
            stdin: str | bytes | None = None, cwd: str | os.PathLike[str] | None = None,
            max_output: int | EllipsisType | None = ...) -> CommandResult:
        """Run one command in the warm sandbox; the same ``CommandResult`` as one-shot runs.

        ``max_output`` (bytes kept per stream) defaults to the session's; it is the host's
        business, so another value needs no other sandbox. With held writes, the changes it
        leaves held are the session's too (``changes``), and the next commands see them.
        """
        result = self._run(command, timeout=timeout, env=env, on_output=on_output,
                           stdin=stdin, cwd=cwd, max_output=max_output)
        if result.writes is not None:
            self.held.add(result.writes)
        return result

    def copy_out_writes(self, timeout: float = 60.0) -> Writes | None:
        """The running command's writes since it started or since the last call, taken now
        (judged and, in auto, the inert ones applied; the held ones join ``changes``) while
        it goes on: a gVisor kernel's cell has ended. Called from another thread than the
        one in ``run``; None when no command runs in a warm sandbox or writes are not held."""
        warm = self._warm
        if warm is None:
            return None
        writes = warm.copy_out_writes(timeout)
        if writes is not None:
            self.held.add(writes)
        return writes

    def changes(self) -> list[Change]:
        """Every change this session's commands left held for review (not on the host)."""
        return self.held.changes()

    def apply(self, paths: Iterable[str] | None = None) -> list[str]:
        """Apply held changes (``paths`` relative to the working dir, all when None); one
        line per path saying what happened (a host edit since is a conflict, not applied)."""
        return self.held.apply(paths)

    def discard(self, paths: Iterable[str] | None = None) -> list[str]:
        """Throw held changes away (``paths``, or all)."""
        return self.held.discard(paths)

    def _run(self, command: str | Sequence[str], *, timeout: float | None,
             env: Mapping[str, str] | None, on_output: OutputCallback | None,
             stdin: str | bytes | None, cwd: str | os.PathLike[str] | None,
             max_output: int | EllipsisType | None) -> CommandResult:
        request = CommandRequest.build(
            command, spec=self.spec, cwd=cwd, timeout=timeout, env=env, stdin=stdin,
            max_output=self.max_output if max_output is ... else max_output)
        with self._lock:
            if self.closed:
                raise RuntimeError("this IsolatedSession is closed")
            if self._warm is None and self.cold_reason is None:
                self._start_locked()
            if self._warm is None:
                return self._run_cold(request, on_output)
            plan = self._check_protection()
            if self._warm is None:
                return self._run_cold(request, on_output)
            try:
                try:
                    return self._run_warm(request, on_output, plan)
                except SandboxStartError:
                    # The agent never accepted the command, so it did not run: one
                    # more try on a fresh sandbox is safe (and never a re-run).
                    self._start_locked()
                    if self._warm is None:
                        return self._run_cold(request, on_output)
                    return self._run_warm(request, on_output, plan)
            finally:
                self._arm_idle_timer()

    def _check_protection(self):
        """Look at the protected paths again; replace the sandbox if they changed.

        Mounts are fixed when a sandbox starts, so a credential or a repository
        that appeared since (made by the host, or by an earlier command) is only
        covered by a new sandbox. Its ``/tmp`` and ``HOME`` start empty, and the
        next result says so.
        """
        plan = plan_for(self.spec)
        warm = self._warm
        if warm is not None and plan.key() != warm.protection:
            changed = sorted(path for path, _ in plan.key() ^ warm.protection)
            self._stop_locked()
            self._note = ("the sandbox was replaced, with a fresh /tmp and HOME, because "
                          "protected or secret paths changed: " + ", ".join(changed[:10]))
            self._start_locked()
        return plan

    def _run_cold(self, request: CommandRequest, on_output: OutputCallback | None
                  ) -> CommandResult:
        result = run_fresh(request, mode=self.mode, require_isolation=self.require_isolation,
                           on_output=on_output)
        result.details["session"] = f"one-shot ({self.cold_reason})"
        return result

    def _run_warm(self, request: CommandRequest, on_output: OutputCallback | None,
                  plan: ProtectionPlan) -> CommandResult:
        """Run ``request`` in the warm sandbox, then the epilogue (``postrun.epilogue``)
        against ``plan``, whatever the outcome (interrupted, or no result at all)."""
        warm = self._warm
        assert warm is not None
        note, self._note = self._note, None
        details = {"session": warm.sandbox_id, **({"session_note": note} if note else {})}
        if self._ready:
            details["ready"], self._ready = self._ready, None
        since, result = time.time(), None
        try:
            result = warm.run(request, on_output)
        except CommandInterrupted as exc:
            result = exc.result
            raise
        finally:
            if warm.retired is not None:  # failed, tainted or interrupted mid-start
                self._stop_locked()
                if warm.retired:
                    self._note = warm.retired
            if result is not None:
                result.details.update(details)
            now = self._warm  # None once a dead sandbox was retired by this command
            epilogue(result, working_dir=self.spec.working_dir, since=since, plan=plan,
                     mounted=plan, etc_scrubbed=now.etc_scrubbed if now is not None else ())
        return result


@atexit.register
def _close_all() -> None:
    for session in list(_SESSIONS):
        with contextlib.suppress(Exception):  # interpreter exit: best effort, no traceback
            session.close()
