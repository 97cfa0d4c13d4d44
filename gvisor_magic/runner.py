"""``run_command_isolated``: validate, choose a backend, run once, report honestly.

The one place where backends are chosen and where falling back is decided.
Falling back is allowed only on ``SandboxStartError``, which a backend raises
only when the command provably did not start; so a command never runs twice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

from . import registry
from .backends.base import Backend, BackendStatus
from .detect import (
    POD_GVISOR_NOTE,
    EnvironmentInfo,
    host_facts,
    inside_gvisor,
    preferred_backends,
)
from .egress.policy import NetworkPolicy
from .errors import CommandInterrupted, IsolationUnavailable, SandboxStartError
from .postrun import epilogue
from .process import OutputCallback
from .protected import PathPolicy, plan_for
from .request import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    DEFAULT_WRITES,
    CommandRequest,
    Limits,
    NetworkSetting,
    SandboxSpec,
    resolve_mode,
    resolve_require_isolation,
    resolve_reuse,
    resolve_spec,
)
from .result import RUNTIME_FAILURE, CommandResult, network_fields
from .run_dirs import make_run_dir
from .warm import POOL, WarmSandbox

log = logging.getLogger("gvisor_magic")

#: A failed probe is retried after this long; a working one is trusted until refresh.
NEGATIVE_PROBE_TTL = 300.0


class _Registry:
    """Backend instances and their cached probe results, shared by the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, Backend] = {}
        self._status: dict[str, tuple[BackendStatus, float]] = {}

    def backend(self, name: str) -> Backend | None:
        with self._lock:
            if name not in self._backends:
                factory = registry.backend_class(name)
                if factory is None:
                    return None
                self._backends[name] = factory()
            return self._backends[name]

    def status(self, name: str, *, refresh: bool = False) -> BackendStatus:
        with self._lock:
            cached = self._status.get(name)
        if cached and not refresh:
            status, when = cached
            if status.available or time.monotonic() - when < NEGATIVE_PROBE_TTL:
                return status
        backend = self.backend(name)
        if backend is None:
            needs = registry.entry(name).requires
            status = BackendStatus(name, False, registry.isolates(name),
                                   f"the {name} backend cannot import its library ({needs})",
                                   fix=f"pip install {needs}")
        else:
            status = backend.probe()
        log.info("gvisor: probe %s -> %s (%s)", name,
                 "usable" if status.available else "unusable", status.reason)
        self.remember(status)
        return status

    def cached(self, name: str) -> BackendStatus | None:
        with self._lock:
            cached = self._status.get(name)
        if cached is None:
            return None
        status, when = cached
        if not status.available and time.monotonic() - when >= NEGATIVE_PROBE_TTL:
            return None
        return status

    def remember(self, status: BackendStatus) -> None:
        with self._lock:
            self._status[status.name] = (status, time.monotonic())

    def forget(self) -> None:
        """Drop cached probes and backend instances (after installing runsc, say), and the
        warm sandboxes they made."""
        with self._lock:
            self._status.clear()
            self._backends.clear()
        POOL.reset()


REGISTRY = _Registry()


def plan(mode: str, require_isolation: bool) -> tuple[list[str], str]:
    """The backends to try, in order, and why that order (warm sessions use it too)."""
    facts = host_facts()
    if mode != "auto":
        return [mode], f"mode={mode!r} was requested"
    order, why = preferred_backends(facts)
    names = [n for n in order if registry.isolates(n) or not require_isolation]
    return names, why


def detect_environment(*, refresh: bool = False, mode: str | None = None,
                       require_isolation: bool | None = None) -> EnvironmentInfo:
    """Probe every backend (cached) and say which one ``auto`` would use, and why."""
    mode = resolve_mode(mode)
    require = resolve_require_isolation(require_isolation)
    if refresh:
        REGISTRY.forget()
    facts = host_facts()
    order, order_reason = preferred_backends(facts)
    statuses = {name: REGISTRY.status(name, refresh=refresh)
                for name in registry.names()}
    names, _ = plan(mode, require)
    chosen = next((n for n in names if statuses[n].available), "")
    skipped = {n: statuses[n].reason for n in names[:names.index(chosen)]} if chosen else {
        n: statuses[n].reason for n in names}
    if not chosen:
        reason = "no usable backend: " + _join(skipped)
    elif skipped:
        reason = f"{chosen}, because " + _join(skipped)
    elif mode != "auto":
        reason = f"{chosen}, as requested by mode={mode!r}"
    else:
        reason = f"{chosen}, the first choice here ({order_reason})"
    return EnvironmentInfo(facts=facts, preference=order, preference_reason=order_reason,
                           backends=statuses, auto_backend=chosen, auto_reason=reason,
                           mode=mode, require_isolation=require)


def is_gvisor_available(*, refresh: bool = False) -> bool:
    """True only if a gVisor backend really ran a probe command here (cached)."""
    facts = host_facts()
    if not facts.is_linux:
        return False
    if refresh:
        REGISTRY.forget()
    order, _ = preferred_backends(facts)
    return any(REGISTRY.status(name, refresh=refresh).available
               for name in order if registry.isolates(name))


def isolation_required(require_isolation: bool, network: NetworkPolicy) -> bool:
    """Whether only gVisor may run the command: asked for, or a network only a sandbox's
    proxy can enforce (an allowlist, or ``True``). Never the host with its whole network."""
    return require_isolation or network.proxied


def check_mode_can_isolate(mode: str, require_isolation: bool,
                           network: NetworkPolicy | None = None) -> None:
    """Refuse at once a mode that never isolates when isolation is required."""
    if mode == "auto" or registry.isolates(mode):
        return
    isolating = " or ".join(f"mode={n!r}" for n in registry.names() if registry.isolates(n))
    if network is not None and network.proxied:
        raise IsolationUnavailable(
            f"network {network.describe()!r} is enforced only in a gVisor sandbox (through "
            f"the host's filtering proxy), and mode={mode!r} never isolates: it would "
            "run with the host's whole network",
            {mode: f"runs on the host without gVisor; use {isolating}"})
    if require_isolation:
        raise IsolationUnavailable(
            f"isolation is required, but mode={mode!r} never isolates",
            {mode: "runs on the host without gVisor"})


def run_command_isolated(
    command: str | Sequence[str],
    spec: SandboxSpec | str | os.PathLike[str] | None = None,
    repo_path: str | os.PathLike[str] | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    mode: str | None = None,
    require_isolation: bool | None = None,
    on_output: OutputCallback | None = None,
    stdin: str | bytes | None = None,
    max_output: int | None = DEFAULT_MAX_OUTPUT,
    reuse: bool | None = None,
    working_dir: str | os.PathLike[str] | None = None,
    network: NetworkSetting | None = None,
    limits: Limits | None = None,
    shell: str | None = None,
    protected_paths: Sequence[str] | PathPolicy | None = None,
    writes: str | None = None,
) -> CommandResult:
    """Run ``command`` once, in the best sandbox available, and say where it ran.

    ``command`` is an argv list (no shell) or a shell script (run by the spec's ``shell``
    with ``-c``). ``spec`` is the sandbox (``SandboxSpec.from_options({...})``: working
    dir, repo, network, limits, protected paths, shell); without one, a fresh temporary
    working dir and the defaults. The sandbox's settings may instead be given one by one
    (``working_dir=``, ``repo_path=``, ``network=``, ``limits=``, ``shell=``,
    ``protected_paths=``, ``writes=``, and a path as the second argument), never together
    with ``spec``. ``writes`` ("direct", "review", "auto"; docs/writes.md) holds the
    command's writes to the working dir for review: ``result.changes``, ``result.apply()``.
    ``mode`` defaults to ``$GVISOR_MAGIC_MODE`` or ``"auto"``;
    ``require_isolation`` to ``$GVISOR_MAGIC_REQUIRE_ISOLATION``: when set, a
    command that cannot run under gVisor raises ``IsolationUnavailable``.
    ``reuse`` (default ``$GVISOR_MAGIC_REUSE``, on): a call that repeats the sandbox of a
    recent call (the same spec) runs in a warm sandbox kept for it, emptied of the last
    call's processes, ``/tmp`` and ``HOME`` (see ``gvisor_magic.warm.WarmPool``).
    See docs/sandbox.md for the sandbox policy (mounts, environment, limits, protected paths).
    """
    sandbox = resolve_spec(spec, {
        "working_dir": working_dir, "repo_path": repo_path, "network": network,
        "limits": limits, "shell": shell, "protected_paths": protected_paths,
        "writes": writes})
    request = CommandRequest.build(command, sandbox, timeout=timeout, env=env, stdin=stdin,
                                   max_output=max_output)
    mode = resolve_mode(mode)
    asked = resolve_require_isolation(require_isolation)
    check_mode_can_isolate(mode, asked, request.network)
    declined = pooled = None
    if resolve_reuse(reuse) and request.working_dir is not None:
        names, why = plan(mode, isolation_required(asked, request.network))
        reused, declined, pooled = _run_reused(request, names, why, mode, on_output)
        if reused is not None:
            return reused
    result = run_fresh(request, mode=mode, require_isolation=asked, on_output=on_output)
    if declined:
        result.details["not_reused"] = declined
    elif pooled is not None and result.backend == pooled:
        # Its key's first call: the next one finds a sandbox booted (WarmPool.prepare).
        POOL.prepare(pooled, request.spec)
    return result


def run_fresh(request: CommandRequest, *, mode: str, require_isolation: bool,
              on_output: OutputCallback | None = None) -> CommandResult:
    """Run ``request`` in a sandbox of its own, made for it and removed after it."""
    check_mode_can_isolate(mode, require_isolation, request.network)
    require = isolation_required(require_isolation, request.network)
    names, why = plan(mode, require)
    if request.cwd is not None:
        request = dataclasses.replace(request.with_spec(working_dir=request.cwd), cwd=None)
    scratch = None
    if request.working_dir is None:
        # Named after this process, so the next run removes it if we are killed.
        scratch = make_run_dir(tempfile.gettempdir())
        request = request.with_spec(working_dir=os.path.realpath(scratch))
    try:
        if any(registry.isolates(name) for name in names):
            # Looked at once, before any backend runs: the post-run check compares with it.
            request = request.with_spec(plan=plan_for(request.spec))
        return _run_first_that_starts(request, names, why, mode, require, on_output)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _run_reused(request: CommandRequest, names: list[str], why: str, mode: str,
                on_output: OutputCallback | None
                ) -> tuple[CommandResult | None, str | None, str | None]:
    """Run ``request`` in a warm sandbox of the pool: (its result, None, None), or (None, why
    not when worth saying, the pool's backend if the pool could keep one for it) to run it
    fresh. Never a result unless the command ran there.

    Only on the backend a fresh run would use (the first of ``names`` not known to be
    unusable), and only if it keeps warm sandboxes.
    """
    name = next((n for n in names if REGISTRY.backend(n) is not None
                 and getattr(REGISTRY.cached(n), "available", True)), None)
    if name is None or registry.transport_class(name) is None:
        return None, None, None
    plan_now = plan_for(request.spec)
    stand_ins = [p.path for p in plan_now.protections if not p.exists]
    if stand_ins:
        # Missing protected paths (a home's .ssh, .ipython...) get stand-ins mounted over
        # them while a sandbox runs; kept between calls, they would stay visible on the host.
        return None, ("a fresh sandbox, as the working dir needs stand-ins for missing "
                      f"protected paths ({', '.join(stand_ins[:3])}...), which must not stay "
                      "on the host after the call"), None
    sandbox = POOL.take(name, request.spec)
    if sandbox is None:
        return None, None, name
    if sandbox.protection != plan_now.key():
        # A credential or repository appeared since it started: its mounts miss it.
        sandbox.retire()
        POOL.give_back(sandbox)
        return None, None, None
    request = request.with_spec(plan=plan_now)
    log.info("gvisor: running %r in warm sandbox %s (%s)", request.display[:200],
             sandbox.sandbox_id, why)
    started, wall = time.monotonic(), time.time()
    try:
        result = sandbox.run(request, on_output, fresh=True)
    except SandboxStartError as exc:
        # Never accepted, so it did not run: a fresh sandbox runs it, once.
        log.info("gvisor: warm sandbox %s did not take the command (%s)", sandbox.sandbox_id,
                 exc.reason)
        return None, None, None
    except CommandInterrupted as exc:
        _after_reuse(sandbox, request, wall, exc.result)
        exc.result = _with_reason(exc.result, {}, mode, time.monotonic() - started)
        raise
    finally:
        POOL.give_back(sandbox)
    _after_reuse(sandbox, request, wall, result)
    return _with_reason(result, {}, mode, time.monotonic() - started), None, None


def _after_reuse(sandbox: WarmSandbox, request: CommandRequest, since: float,
                 result: CommandResult) -> None:
    """The epilogue of a command run in ``sandbox``: what its mounts protected and which
    sandbox it was, as a fresh sandbox's result says, then the post-run check."""
    extra = {"sandbox_id": sandbox.sandbox_id,
             "reused": f"call {sandbox.commands} of a warm sandbox kept for this spec "
                       "(each call starts with an empty /tmp and HOME and no process "
                       "of another)"}
    if sandbox.commands == 1 and sandbox.ready_since is not None:
        extra["ready"] = ready_note(sandbox)
    epilogue(result, working_dir=request.working_dir, since=since, plan=request.plan,
             mounted=sandbox.spec.plan, etc_scrubbed=sandbox.etc_scrubbed, extra=extra)


def ready_note(sandbox: WarmSandbox) -> str:
    """What a result says of a sandbox booted ahead of need (``WarmPool.prepare``)."""
    assert sandbox.ready_since is not None
    return (f"booted ahead of need, {time.monotonic() - sandbox.ready_since:.1f} s before "
            "its first command was asked")


def _run_first_that_starts(request: CommandRequest, names: list[str], why: str, mode: str,
                           require: bool, on_output: OutputCallback | None) -> CommandResult:
    reasons: dict[str, str] = {}
    for name in names:
        backend = REGISTRY.backend(name)
        cached = REGISTRY.cached(name)
        if backend is None or (cached is not None and not cached.available):
            status = cached or REGISTRY.status(name)
            reasons[name] = status.reason + (f" (fix: {status.fix})" if status.fix else "")
            log.info("gvisor: skipping %s: %s", name, reasons[name])
            continue
        writes_note = None
        if request.spec.holds_writes and not registry.isolates(name):
            if request.spec.writes is not None:  # asked for: never weakened
                reasons[name] = (f"cannot hold writes (writes={request.spec.writes!r}): it runs "
                                 "on the host, where the command's writes land as made; use "
                                 "writes='direct' to run there knowingly")
                continue
            writes_note = (f"direct: {name} runs on the host and cannot hold writes (the "
                           f"default, {DEFAULT_WRITES!r}, holds them where gVisor runs)")
        log.info("gvisor: running %r with %s (%s)", request.display[:200], name, why)
        started, wall = time.monotonic(), time.time()
        try:
            result = backend.run(request, on_output)
        except SandboxStartError as exc:
            reason = exc.reason + (f" (fix: {exc.fix})" if exc.fix else "")
            log.warning("gvisor: %s could not start the sandbox (the command did not run): %s",
                        name, exc.reason)
            if backend.isolated and not exc.unsupported \
                    and REGISTRY.status(name, refresh=True).available:
                # gVisor works here (a probe sandbox just ran): this command's sandbox
                # failed, which is this command's error, never a reason to run it elsewhere.
                result = _not_started(name, reason, request)
                return _with_reason(result, reasons, mode, time.monotonic() - started)
            reasons[name] = reason
            continue
        except CommandInterrupted as exc:
            _after_run(backend, request, wall, exc.result)
            exc.result = _with_reason(exc.result, reasons, mode, time.monotonic() - started)
            raise
        _after_run(backend, request, wall, result)
        if writes_note:
            result.details["writes"] = writes_note
        return _with_reason(result, reasons, mode, time.monotonic() - started)
    if require or mode != "auto":
        raise IsolationUnavailable(
            f"cannot run the command with {' or '.join(names) or 'any backend'}"
            + (" and isolation is required" if require else ""), reasons)
    raise IsolationUnavailable("no backend could start the command", reasons)


def _not_started(name: str, reason: str, request: CommandRequest) -> CommandResult:
    return CommandResult(
        returncode=RUNTIME_FAILURE, stdout="", stderr="", backend=name, isolated=True,
        **network_fields(request.network), details={"not_started": reason},
        error=(f"the sandbox could not start for this command, which did not run: {reason}. "
               f"{name} itself works here (a probe sandbox just ran), so it was not tried on "
               "another backend"))


def _after_run(backend: Backend, request: CommandRequest, since: float,
               result: CommandResult) -> None:
    """The epilogue of a one-shot run: its backend's layout already said what it protected."""
    epilogue(result, working_dir=request.working_dir, since=since, plan=request.plan,
             isolated=backend.isolated)


def _with_reason(result: CommandResult, reasons: dict[str, str], mode: str,
                 duration: float) -> CommandResult:
    """Stamp the fallback reason and the whole wall time (sandbox set-up included)."""
    fallback = _join(reasons) if reasons else None
    if fallback is None and not result.isolated and mode != "auto" \
            and not registry.isolates(mode):
        fallback = f"mode {mode!r} was requested: gVisor was not used"
    if not result.isolated and inside_gvisor():
        # Not isolated from the kernel, but not on the node's kernel either: say which.
        fallback = POD_GVISOR_NOTE + (f"; {fallback}" if fallback else "")
        result = dataclasses.replace(result, details={**result.details, "pod_sandbox": "gVisor"})
    if fallback:
        level = logging.WARNING if reasons else logging.INFO
        log.log(level, "gvisor: ran with %s (%s) because %s", result.backend,
                "isolated" if result.isolated else "NOT isolated", fallback)
    return dataclasses.replace(result, fallback_reason=fallback, duration=duration)


def _join(reasons: Mapping[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in reasons.items())
