"""``gvisor-magic mcp``: the runner as an MCP server, for coding agents.

Built on the official ``mcp`` SDK (``MCPServer``), over stdio, or streamable HTTP bound to
127.0.0.1 behind a bearer token (``--http PORT``). Its tools, each with typed input and
output schemas:

- ``run``: one command in a fresh or reused sandbox (``arun``);
- ``session_run``: a command in a named warm session, made at its first use;
- ``read_file`` / ``write_file``: a file of the working dir, read or written by a command in
  the sandbox (so what is hidden from commands is hidden from these too, and a written file
  is judged like any command's writes: held or quarantined where a host tool would run it),
  never outside the working dir and never through a symlink;
- ``changes`` / ``apply`` / ``discard``: the writes held for review, of a session or of the
  one-shot runs;
- ``status``: what ``gvisor-magic doctor`` knows, and this server's settings.

Every command's result says where it ran (``backend``, ``isolated``, ``fallback_reason``),
what it was refused (``hosts_refused``), what was quarantined or held, and the session's
note. The settings (the working dir, network, limits, writes, the longest timeout, whether
isolation is required) come from the command line or a JSON config file, never from the
model: a tool call can ask for a subdirectory of the working dir or a shorter timeout,
never for more. Bad input is a tool error with the reason, never a traceback; cancelling a
call interrupts its command (``CommandCancelled``), and the server's sandboxes end with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import stat
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from .aio import AsyncIsolatedSession, arun
from .errors import GvisorMagicError
from .request import DEFAULT_TIMEOUT, SandboxSpec
from .result import CommandResult
from .writes import HeldChanges

#: The most a ``write_file`` may write, and the most ``read_file`` returns (bytes).
MAX_WRITE = 8 * 2**20
MAX_READ = 8 * 2**20
#: Named sessions at once (each is a warm sandbox).
MAX_SESSIONS = 8
#: Output kept per stream of a command (bytes); the result says when it was cut.
MAX_OUTPUT = 1 * 2**20


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """What the operator decided; no tool call can widen it."""

    spec: SandboxSpec  # the working dir (the root of every path), network, limits, writes
    timeout: float = DEFAULT_TIMEOUT  # the longest a command may run (seconds)
    require_isolation: bool | None = None  # True: refuse to run anything outside gVisor
    mode: str | None = None

    @property
    def root(self) -> str:
        assert self.spec.working_dir is not None
        return self.spec.working_dir


class HeldChange(BaseModel):
    path: str
    kind: str
    reason: str | None = None


class RunResult(BaseModel):
    """One command's result, as honest as the notebook's."""

    stdout: str
    stderr: str
    exit_code: int
    success: bool
    backend: str = Field(description="where it ran: runsc or docker (gVisor), or subprocess")
    isolated: bool = Field(description="True only when it ran under gVisor")
    fallback_reason: str | None = Field(None, description="why a better backend was not used")
    timed_out: bool = False
    duration_s: float = 0.0
    truncated: bool = Field(False, description="output beyond the kept bytes was cut")
    network: str = "off"
    hosts_refused: list[str] = Field(default_factory=list)
    quarantined: list[str] = Field(default_factory=list)
    held: list[HeldChange] = Field(default_factory=list,
                                   description="writes held for review (not on the host)")
    session: str | None = None
    session_note: str | None = None
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)


class FileText(BaseModel):
    path: str
    text: str
    bytes_read: int
    truncated: bool
    backend: str
    isolated: bool


class ChangeList(BaseModel):
    session: str | None
    changes: list[HeldChange]


class ActionReport(BaseModel):
    session: str | None
    lines: list[str]


class Status(BaseModel):
    gvisor_usable: bool
    backend: str
    reason: str
    backends: dict[str, str]
    working_dir: str
    network: str
    limits: str
    writes: str
    max_timeout_s: float
    require_isolation: bool
    sessions: list[str]


class AgentError(GvisorMagicError):
    """A tool call the server refuses, with the reason the model is told."""


def relative_inside(root: str, path: str) -> str:
    """``path`` (relative to ``root``, or absolute below it) as a clean relative path, if
    it stays inside ``root`` and no existing part of it is a symlink; ``AgentError`` if
    not."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise AgentError("a path must be a non-empty string without NUL bytes")
    full = os.path.normpath(os.path.join(root, path))
    if full != root and not full.startswith(root.rstrip("/") + "/"):
        raise AgentError(f"{path!r} is outside the working dir {root}")
    relative = os.path.relpath(full, root)
    walked = root
    for part in [] if relative == "." else relative.split("/"):
        walked = os.path.join(walked, part)
        try:
            info = os.lstat(walked)
        except FileNotFoundError:
            break
        except OSError as exc:
            raise AgentError(f"{path!r}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            raise AgentError(f"{path!r} goes through a symlink ({os.path.relpath(walked, root)})"
                             ": refused, it could lead out of the working dir")
    return relative


def _result(result: CommandResult, session: str | None = None,
            notes: Sequence[str] = ()) -> RunResult:
    quarantined = result.details.get("quarantined", "")
    return RunResult(
        stdout=result.stdout, stderr=result.stderr, exit_code=result.returncode,
        success=result.success, backend=result.backend, isolated=result.isolated,
        fallback_reason=result.fallback_reason, timed_out=result.timed_out,
        duration_s=round(result.duration, 3), truncated=result.truncated,
        network=result.network_policy,
        hosts_refused=[item.describe() for item in result.blocked],
        quarantined=[q for q in quarantined.split("; ") if q],
        held=[HeldChange(path=c.path, kind=str(c.kind), reason=c.held_reason)
              for c in result.held],
        session=session, session_note=result.details.get("session_note"),
        error=result.error, warnings=[*notes, *result.warnings(held=False)])


def build_server(settings: AgentSettings) -> Any:
    """The MCP server for ``settings`` (an ``MCPServer``; ``run`` it)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer(
        "gvisor-magic", log_level="WARNING",  # stderr is the client's: no line per call
        instructions=(
            "Runs shell commands in a gVisor sandbox whose working dir is "
            f"{settings.root}. Every result says where the command ran (backend, isolated) "
            "and what it was refused. Paths are relative to the working dir."))
    sessions: dict[str, AsyncIsolatedSession] = {}
    one_shot_held = HeldChanges()

    def timeout_for(asked: float | None) -> tuple[float, list[str]]:
        if asked is None:
            return settings.timeout, []
        if not asked > 0:
            raise ToolError("timeout must be a positive number of seconds")
        if asked > settings.timeout:
            return settings.timeout, [f"timeout {asked:g} s asked; this server allows at most "
                                      f"{settings.timeout:g} s, which was used"]
        return asked, []

    def inside(path: str) -> str:
        """``relative_inside`` the working dir, its refusal a tool error."""
        try:
            return relative_inside(settings.root, path)
        except AgentError as exc:
            raise ToolError(str(exc)) from None

    def spec_at(cwd: str | None) -> SandboxSpec:
        if cwd is None:
            return settings.spec
        folder = os.path.join(settings.root, inside(cwd))
        if not os.path.isdir(folder):
            raise ToolError(f"cwd {cwd!r} is not a directory of the working dir")
        return SandboxSpec.from_options({"working_dir": folder}, base=settings.spec)

    async def one_shot(command: str | list[str], spec: SandboxSpec, timeout: float,
                       stdin: str | None = None, env: dict[str, str] | None = None
                       ) -> CommandResult:
        try:
            result = await arun(command, spec, timeout=timeout, stdin=stdin, env=env,
                                mode=settings.mode, require_isolation=settings.require_isolation,
                                max_output=MAX_OUTPUT)
        except GvisorMagicError as exc:
            raise ToolError(str(exc)) from None
        if result.writes is not None:
            one_shot_held.add(result.writes)
        return result

    def session_named(name: str, create: bool) -> AsyncIsolatedSession:
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise ToolError("a session name is 1-64 printable characters")
        if name in sessions:
            return sessions[name]
        if not create:
            raise ToolError(f"no session named {name!r} (sessions: "
                            f"{', '.join(sorted(sessions)) or 'none'})")
        if len(sessions) >= MAX_SESSIONS:
            raise ToolError(f"at most {MAX_SESSIONS} sessions; end one first")
        try:
            sessions[name] = AsyncIsolatedSession(
                settings.spec, mode=settings.mode, max_output=MAX_OUTPUT,
                require_isolation=settings.require_isolation)
        except GvisorMagicError as exc:
            raise ToolError(str(exc)) from None
        return sessions[name]

    @server.tool()
    async def run(command: str | list[str], cwd: str | None = None,
                  timeout: float | None = None, stdin: str | None = None,
                  env: dict[str, str] | None = None) -> RunResult:
        """Run a command once in a sandbox: a shell script (a string) or an argv (a list).
        ``cwd``: a directory of the working dir to run in (and the only one mounted)."""
        seconds, notes = timeout_for(timeout)
        result = await one_shot(command, spec_at(cwd), seconds, stdin, env)
        return _result(result, notes=notes)

    @server.tool()
    async def session_run(session: str, command: str | list[str], cwd: str | None = None,
                          timeout: float | None = None, stdin: str | None = None,
                          env: dict[str, str] | None = None) -> RunResult:
        """Run a command in the warm session ``session`` (made at its first use), whose /tmp
        and HOME persist between its commands."""
        seconds, notes = timeout_for(timeout)
        named = session_named(session, create=True)
        if cwd is not None:
            cwd = os.path.join(settings.root, inside(cwd))
        try:
            result = await named.run(command, cwd=cwd, timeout=seconds, stdin=stdin, env=env)
        except GvisorMagicError as exc:
            raise ToolError(str(exc)) from None
        return _result(result, session, notes)

    @server.tool()
    async def read_file(path: str, max_bytes: int = 1 * 2**20) -> FileText:
        """Read a file of the working dir, as a command in the sandbox sees it (UTF-8;
        undecodable bytes replaced). Never outside the working dir or through a symlink."""
        if not 0 < max_bytes <= MAX_READ:
            raise ToolError(f"max_bytes must be from 1 to {MAX_READ}")
        relative = inside(path)
        full = os.path.join(settings.root, relative)
        if not os.path.isfile(full):
            raise ToolError(f"{path!r} is not a file of the working dir")
        result = await one_shot(["head", "-c", str(max_bytes + 1), "--", full],
                                settings.spec, min(settings.timeout, 60.0))
        if not result.success:
            raise ToolError(f"cannot read {path!r}: {result.stderr.strip() or result.error}")
        data = result.stdout
        return FileText(path=relative, text=data[:max_bytes], bytes_read=len(data.encode()),
                        truncated=len(data.encode()) > max_bytes, backend=result.backend,
                        isolated=result.isolated)

    @server.tool()
    async def write_file(path: str, content: str, session: str | None = None) -> RunResult:
        """Write ``content`` (UTF-8) to a file of the working dir, making its directories,
        by a command in the sandbox (in ``session`` if given): the write is judged like
        any command's (held for review or quarantined where a host tool would run it)."""
        if len(content.encode()) > MAX_WRITE:
            raise ToolError(f"content is larger than {MAX_WRITE} bytes")
        relative = inside(path)
        if relative == ".":
            raise ToolError("path names the working dir itself, not a file")
        full = os.path.join(settings.root, relative)
        script = ['/bin/sh', '-c', 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"', 'sh',
                  full]
        if session is None:
            result = await one_shot(script, settings.spec, min(settings.timeout, 60.0),
                                    stdin=content)
            return _result(result)
        named = session_named(session, create=True)
        try:
            result = await named.run(script, timeout=min(settings.timeout, 60.0),
                                     stdin=content)
        except GvisorMagicError as exc:
            raise ToolError(str(exc)) from None
        return _result(result, session)

    def held_of(session: str | None) -> HeldChanges:
        return one_shot_held if session is None else session_named(session, False).blocking.held

    @server.tool()
    async def changes(session: str | None = None) -> ChangeList:
        """The writes held for review (nothing of them is on the host), of ``session``, or
        of the one-shot runs when none is named."""
        pending = held_of(session).pending()
        return ChangeList(session=session, changes=[
            HeldChange(path=c.path, kind=str(c.kind), reason=c.held_reason) for _, c in pending])

    @server.tool()
    async def apply(paths: list[str] | None = None, session: str | None = None) -> ActionReport:
        """Apply held writes to the host (``paths``, or all): what happened to each."""
        return ActionReport(session=session, lines=held_of(session).apply(paths))

    @server.tool()
    async def discard(paths: list[str] | None = None,
                      session: str | None = None) -> ActionReport:
        """Throw held writes away (``paths``, or all)."""
        return ActionReport(session=session, lines=held_of(session).discard(paths))

    @server.tool()
    async def status() -> Status:
        """Whether gVisor runs here, what would run a command, and this server's settings."""
        import asyncio

        from . import registry
        from .runner import detect_environment

        info = await asyncio.to_thread(detect_environment)
        spec = settings.spec
        here = (info.auto_backend,) if info.auto_backend else None
        return Status(
            gvisor_usable=bool(info.isolated), backend=info.auto_backend,
            reason=info.auto_reason,
            backends={n: ("usable" if s.available else f"not usable: {s.reason}")
                      for n, s in info.backends.items()},
            working_dir=settings.root, network=spec.network.describe(),
            limits=spec.limits.describe(registry.enforcement(here)), writes=spec.writes_mode,
            max_timeout_s=settings.timeout,
            require_isolation=bool(settings.require_isolation), sessions=sorted(sessions))

    server.gvisor_sessions = sessions  # closed by serve()
    return server


def settings_from(options: dict[str, Any]) -> AgentSettings:
    """``AgentSettings`` from the command line's (or a config file's) options:
    ``working_dir``, the sandbox settings ``SandboxSpec.from_options`` reads, ``timeout``,
    ``require_isolation``, ``mode``."""
    known = {"working_dir", "network", "allow_hosts", "limits", "protected_paths", "writes",
             "timeout", "require_isolation", "mode"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AgentError(f"unknown setting(s) {', '.join(unknown)}: expected "
                         f"{', '.join(sorted(known))}")
    working_dir = options.get("working_dir") or os.getcwd()
    if not os.path.isdir(working_dir):
        raise AgentError(f"working dir {working_dir!r} is not a directory")
    sandbox = {k: v for k, v in options.items()
               if k in {"network", "allow_hosts", "limits", "protected_paths", "writes"}
               and v not in (None, [], {})}
    spec = SandboxSpec.from_options({"working_dir": os.path.realpath(working_dir), **sandbox})
    timeout = options.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise AgentError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return AgentSettings(spec=spec, timeout=float(timeout),
                         require_isolation=True if options.get("require_isolation") else None,
                         mode=options.get("mode"))


def load_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read the config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise AgentError(f"the config file {path} must hold a JSON object")
    return data


def serve(settings: AgentSettings, http_port: int | None = None,
          token: str | None = None) -> None:
    """Serve over stdio (the default) or streamable HTTP on 127.0.0.1:``http_port`` behind
    ``Authorization: Bearer TOKEN`` (one is made and printed on stderr if not given)."""
    import asyncio
    import signal

    server = build_server(settings)

    async def main() -> None:
        # SIGTERM (a supervisor, kubectl, the client's own shutdown) ends the server as
        # Ctrl-C does: its sessions close and its sandboxes stop before it exits. (Over
        # HTTP, uvicorn shuts down on it and then raises it again, to this no-op handler.)
        if http_port is None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM,
                                                          asyncio.current_task().cancel)
        else:
            signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            if http_port is None:
                await server.run_stdio_async()
            else:
                await _serve_http(server, http_port, token or secrets.token_urlsafe(24))
        finally:
            await asyncio.gather(*(s.aclose() for s in server.gvisor_sessions.values()),
                                 return_exceptions=True)

    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(main())
    from .warm import POOL

    POOL.close()  # the one-shot runs' warm sandboxes, before the process exits


async def _serve_http(server: Any, port: int, token: str) -> None:
    import uvicorn
    from starlette.responses import JSONResponse

    app = server.streamable_http_app(host="127.0.0.1")

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or ())
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given, f"Bearer {token}"):
                response = JSONResponse({"error": "a bearer token is required"}, 401)
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    print(f"gvisor-magic mcp: http://127.0.0.1:{port}/mcp (Authorization: Bearer {token})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(guarded, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on")
    await uvicorn.Server(config).serve()
