"""``%%isolated``, ``%isolated`` and ``%isolation``: thin IPython faces over the runner.

Like ``%%bash`` (IPython's ``script.py``), output streams live into the cell,
a non-zero exit raises ``CalledProcessError`` (unless ``--no-raise-error``) and
``_exit_code`` is set; unlike it, the command runs under gVisor when it can,
and every run says on stderr where it ran.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.utils.text import DollarFormatter, SList
from traitlets import Bool, Dict, Float, Int, List, TraitError, Unicode, validate
from traitlets.config import Config, Configurable

from .. import registry
from ..errors import CommandInterrupted, InvalidRequestError, IsolationUnavailable
from ..protected import PathPolicy
from ..request import MODES, Limits, SandboxSpec
from ..result import CommandResult
from ..runner import detect_environment, run_command_isolated
from .kernel_session import KernelSessions
from .routing import BangRouter
from .widget import VIEWS, IsolationState, make_widget


class StreamedSList(SList):
    """The lines of a command whose output was already shown while it ran.

    ``%isolated ls`` streams like ``!ls``; returning a plain SList would then
    print everything a second time, so this one displays nothing itself.
    ``files = %isolated ls`` still gets every line.
    """

    def _ipython_display_(self) -> None:
        return None


def _default_shell() -> str:
    return shutil.which("bash") or "/bin/sh"


class Isolation(Configurable):
    """Settings of the gvisor_magic extension: ``%config Isolation.<name> = value``.

    Environment variables (GVISOR_MAGIC_MODE, GVISOR_MAGIC_REQUIRE_ISOLATION)
    apply while a setting is None; a setting made here overrides them.
    """

    mode = Unicode(None, allow_none=True, help="Backend: auto, runsc, docker or subprocess "
                   "(None: $GVISOR_MAGIC_MODE, else auto).").tag(config=True)
    timeout = Float(300.0, allow_none=True, help="Seconds per command; None for no limit."
                    ).tag(config=True)
    require_isolation = Bool(None, allow_none=True, help="Refuse to run without gVisor "
                             "(None: $GVISOR_MAGIC_REQUIRE_ISOLATION).").tag(config=True)
    network = Bool(False, help="Allow network access inside the sandbox.").tag(config=True)
    route_bang = Bool(False, help="Route !cmd, !!cmd, x = !cmd and %sx through the sandbox "
                      "(%pip/%conda/%uv stay on the host).").tag(config=True)
    # A static default, not a @default method: when %config's value is rejected,
    # traitlets rolls a never-read trait back to its static default ('' otherwise).
    shell = Unicode(_default_shell(), help="Shell that runs %%isolated cells "
                    "(default: bash, else sh).").tag(config=True)
    max_output = Int(4 * 1024 * 1024, help="Bytes of each stream kept in results."
                     ).tag(config=True)
    warm_session = Bool(True, help="Keep one sandbox warm for this kernel's commands "
                        "(milliseconds each); False starts a fresh sandbox per command."
                        ).tag(config=True)
    prewarm = Bool(True, help="Start the warm sandbox in the background at %load_ext."
                   ).tag(config=True)
    quiet = Bool(False, help="Do not print the one-line status after each run."
                 ).tag(config=True)
    limits = Dict(help="Resource limits over the defaults, e.g. {'memory': '2G', "
                  "'max_processes': 256, 'tmp_size': '1G', 'cpus': 1} (see gvisor_magic.Limits; "
                  "'none' for no limit).").tag(config=True)
    protected_paths = List(Unicode(), help="Changes to the protected paths: 'data/raw' makes "
                           "a path of the working dir read-only in the sandbox, '-.bashrc' "
                           "relaxes a built-in entry (shown in results and the widget).",
                           ).tag(config=True)

    # -- configuration ---------------------------------------------------------

    @validate("mode")
    def _check_mode(self, proposal):
        value = proposal["value"]
        if value is not None and value not in MODES:
            raise TraitError(f"Isolation.mode must be one of {', '.join(MODES)} (or None), "
                             f"not {value!r}")
        return value

    @validate("timeout")
    def _check_timeout(self, proposal):
        value = proposal["value"]
        if value is not None and not value > 0:
            raise TraitError(f"Isolation.timeout must be > 0 seconds or None, not {value!r}")
        return value

    @validate("max_output")
    def _check_max_output(self, proposal):
        if proposal["value"] <= 0:
            raise TraitError("Isolation.max_output must be a positive number of bytes")
        return proposal["value"]

    @validate("limits")
    def _check_limits(self, proposal):
        try:
            Limits.parse(proposal["value"])
        except (InvalidRequestError, TypeError) as exc:
            raise TraitError(f"Isolation.limits: {exc}") from None
        return proposal["value"]

    @validate("protected_paths")
    def _check_protected_paths(self, proposal):
        try:
            PathPolicy.parse(proposal["value"])
        except (InvalidRequestError, TypeError) as exc:
            raise TraitError(f"Isolation.protected_paths: {exc}") from None
        return proposal["value"]

    def effective_limits(self, overrides: dict[str, str] | None = None) -> Limits:
        """The defaults, then ``Isolation.limits``, then a cell's ``--limit`` options."""
        return Limits.parse(overrides or {}, Limits.parse(self.limits))

    @validate("shell")
    def _check_shell(self, proposal):
        value = proposal["value"]
        if not os.path.isabs(value) or not os.access(value, os.X_OK):
            raise TraitError(f"Isolation.shell must be an executable absolute path, "
                             f"not {value!r}")
        return value



def _settings(shell) -> Isolation:
    """``Isolation`` from the shell's config, minus values ``%config`` rejected before.

    ``%config`` merges a value into the shell's shared config even when
    ``Isolation`` rejects it, and loading the extension again would then fail on it.
    """
    section = shell.config["Isolation"] if shell is not None and "Isolation" in shell.config \
        else {}
    for name in list(section):
        try:
            Isolation(config=Config({"Isolation": {name: section[name]}}))
        except TraitError as exc:
            print(f"[gvisor-magic] ignoring a rejected setting: {exc}", file=sys.stderr)
            del section[name]
    return Isolation(parent=shell)


@magics_class
class IsolatedMagics(Magics):
    """``%%isolated``, ``%isolated`` and ``%isolation`` (settings live in ``Isolation``)."""

    def __init__(self, shell=None, **kwargs) -> None:
        super().__init__(shell=shell, **kwargs)
        self.settings = _settings(shell)
        self.state = IsolationState()
        self.router = BangRouter(shell, self._run_routed)
        self.sessions = KernelSessions()
        self.settings.observe(self._route_changed, names="route_bang")
        if self.settings.route_bang:
            self.router.install()
        if self.settings.warm_session and self.settings.prewarm:
            self.sessions.prewarm(self._spec(os.getcwd(), None, None),
                                  self.settings.mode, self.settings.require_isolation)

    def _spec(self, workdir: str, repo: str | None, network: bool | None,
              limits: Limits | None = None) -> SandboxSpec:
        settings = self.settings
        return SandboxSpec.build(
            os.path.realpath(workdir), repo and os.path.realpath(repo),
            network=settings.network if network is None else network,
            limits=limits or settings.effective_limits(), shell=settings.shell,
            protected_paths=list(settings.protected_paths))

    def _route_changed(self, change) -> None:
        if change["new"]:
            self.router.install()
        else:
            self.router.uninstall()

    # -- the one place that runs things ----------------------------------------------

    def run(self, command: str, *, capture: bool = False, quiet: bool | None = None,
            mode: str | None = None, timeout: float | str | None = "trait",
            workdir: str | None = None, repo: str | None = None,
            env: dict[str, str] | None = None, network: bool | None = None,
            require_isolation: bool | None = None, show_stdout: bool = True,
            show_stderr: bool = True, fresh: bool = False,
            limits: dict[str, str] | None = None) -> CommandResult:
        """Run ``command`` (a shell script), stream it, record it in the widget."""

        def stream(name: str, text: str) -> None:
            if capture or (name == "stdout" and not show_stdout) or (
                    name == "stderr" and not show_stderr):
                return
            target = sys.stdout if name == "stdout" else sys.stderr
            target.write(text)
            target.flush()

        settings = self.settings
        require = settings.require_isolation if require_isolation is None else require_isolation
        seconds = settings.timeout if timeout == "trait" else timeout
        effective = settings.effective_limits(limits)
        try:
            if settings.warm_session and not fresh:
                session = self.sessions.get(
                    self._spec(workdir or os.getcwd(), repo, network, effective),
                    mode or settings.mode, require)
                self.state.session = "starting" if session.state == "stopped" else None
                result = session.run(command, timeout=seconds, env=env, on_output=stream,
                                     max_output=settings.max_output)
            else:
                result = run_command_isolated(
                    command, working_dir=workdir or os.getcwd(), repo_path=repo,
                    timeout=seconds, env=env, mode=mode or settings.mode,
                    require_isolation=require,
                    network=settings.network if network is None else network, on_output=stream,
                    max_output=settings.max_output, shell=settings.shell, limits=effective,
                    protected_paths=list(settings.protected_paths))
        except IsolationUnavailable as exc:
            self.state.record_blocked(str(exc).splitlines()[0])
            VIEWS.refresh(self.state)
            raise
        except CommandInterrupted as exc:
            self.state.record(exc.result, outcome="interrupted")
            VIEWS.refresh(self.state)
            self._status(exc.result, quiet, "interrupted")
            raise
        self.state.record(result)
        self.state.limits = effective.describe(registry.enforcement((result.backend,)))
        self.state.session = self.sessions.describe() if settings.warm_session else \
            "off (a fresh sandbox per command)"
        VIEWS.refresh(self.state)
        self._status(result, quiet)
        return result

    def _status(self, result: CommandResult, quiet: bool | None, note: str = "") -> None:
        if not (self.settings.quiet if quiet is None else quiet):
            line = result.describe() + (f" ({note})" if note else "")
            marker = "" if result.isolated else "WARNING: "
            print(f"[gvisor-magic] {marker}{line}", file=sys.stderr, flush=True)
        # What needs attention is said even with --quiet.
        for warning in result.warnings():
            print(f"[gvisor-magic] WARNING: {warning}", file=sys.stderr, flush=True)

    def expand(self, text: str) -> str:
        """``$var`` and ``{expr}`` from the user's namespace, as ``!`` does, line by line.

        Each line is all or nothing, like one ``!`` line. (IPython's formatter is
        meant for one line: given several, it drops the text before a ``$var``
        that follows a newline.)
        """
        formatter, namespace = DollarFormatter(), dict(self.shell.user_ns)

        def one(line: str) -> str:
            try:
                return formatter.vformat(line, args=[], kwargs=namespace)
            except Exception:
                return line

        return "\n".join(one(line) for line in text.split("\n"))

    def _run_routed(self, command: str, capture: bool) -> CommandResult:
        return self.run(command, capture=capture)

    # -- magics -------------------------------------------------------------------------

    @magic_arguments()
    @argument("--mode", choices=MODES, help="backend for this cell")
    @argument("--timeout", type=float, help="seconds (default: Isolation.timeout)")
    @argument("--workdir", help="host directory mounted read-write as the cwd "
              "(default: the kernel's current directory)")
    @argument("--repo", help="host directory mounted read-only at the same path")
    @argument("--env", action="append", default=[], metavar="KEY=VALUE",
              help="environment variable for the command (repeatable)")
    @argument("--network", action="store_true", help="allow network access")
    @argument("--require-isolation", action="store_true",
              help="raise IsolationUnavailable rather than run without gVisor")
    @argument("--out", metavar="VAR", help="store stdout in VAR instead of printing it")
    @argument("--err", metavar="VAR", help="store stderr in VAR instead of printing it")
    @argument("--result", metavar="VAR", help="store the CommandResult in VAR")
    @argument("--no-raise-error", action="store_true",
              help="do not raise CalledProcessError on a non-zero exit")
    @argument("--quiet", action="store_true", help="no status line")
    @argument("--fresh", action="store_true",
              help="run in a fresh one-shot sandbox instead of the kernel's warm one")
    @argument("--limit", action="append", default=[], metavar="NAME=VALUE",
              help="resource limit for this cell, e.g. memory=1G, max_processes=64, "
                   "tmp_size=2G, cpus=1 (repeatable; see Isolation.limits)")
    @cell_magic("isolated")
    def magic_isolated(self, line: str, cell: str) -> None:
        """Run the cell as a shell script in a gVisor sandbox.

        Output streams live; a non-zero exit raises CalledProcessError, as with %%bash.
        ``$var`` and ``{expr}`` are expanded in the options and the body, as with ``!``.
        """
        args = parse_argstring(self.magic_isolated, line)
        env = {}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
            env[key] = value
        limits = {}
        for item in args.limit:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--limit expects NAME=VALUE, got {item!r}")
            limits[key.strip()] = value
        self.settings.effective_limits(limits)  # a bad limit stops the cell before it runs
        body = self.expand(cell)
        result = self.run(
            body, mode=args.mode, timeout=args.timeout if args.timeout is not None else "trait",
            workdir=args.workdir, repo=args.repo, env=env,
            network=True if args.network else None,
            require_isolation=True if args.require_isolation else None, fresh=args.fresh,
            quiet=True if args.quiet else None,
            show_stdout=not args.out, show_stderr=not args.err, limits=limits)
        self.shell.user_ns["_exit_code"] = result.returncode
        if args.out:
            self.shell.user_ns[args.out] = result.stdout
        if args.err:
            self.shell.user_ns[args.err] = result.stderr
        if args.result:
            self.shell.user_ns[args.result] = result
        if not result.success and not args.no_raise_error:
            raise subprocess.CalledProcessError(result.returncode, body, result.stdout,
                                                result.stderr)

    @line_magic
    def isolated(self, line: str) -> SList:
        """``%isolated CMD``: like ``!CMD``; ``files = %isolated ls`` also gets an SList."""
        if not line.strip():
            raise ValueError("usage: %isolated COMMAND")
        result = self.run(line, capture=False)
        self.shell.user_ns["_exit_code"] = result.returncode
        return StreamedSList(result.stdout.splitlines())

    @line_magic
    def isolation(self, line: str):
        """``%isolation on|off|status|restart``: route ``!``, show the status, or replace
        the kernel's warm sandbox."""
        action = (shlex.split(line) or ["status"])[0]
        if action == "on":
            self.settings.route_bang = True
            print("[gvisor-magic] !, !! and %sx now run isolated (%pip, %conda, %uv stay on "
                  "the host)", file=sys.stderr)
        elif action == "off":
            self.settings.route_bang = False
            print("[gvisor-magic] !, !! and %sx run on the host again", file=sys.stderr)
        elif action == "status":
            return self.status_widget()
        elif action == "restart":
            self.sessions.restart()
            self.state.session = self.sessions.describe()
            VIEWS.refresh(self.state)
            print("[gvisor-magic] the warm sandbox was replaced (fresh /tmp and HOME)",
                  file=sys.stderr)
        else:
            raise ValueError(f"usage: %isolation on|off|status|restart (got {action!r})")
        return None

    def status_widget(self):
        """A live status widget (refreshed after every run in this kernel)."""
        if self.state.last is None and self.state.backend == "unknown":
            self.refresh_environment()
        return make_widget(self.state)

    def refresh_environment(self) -> None:
        info = detect_environment(mode=self.settings.mode,
                                  require_isolation=self.settings.require_isolation)
        self.state.session = self.sessions.describe()
        runsc = info.backends.get("runsc")
        self.state.runsc_version = runsc.version if runsc is not None else None
        self.state.require_isolation = info.require_isolation
        self.state.network = self.settings.network
        self.state.pod_gvisor = info.pod_runs_gvisor
        self.state.limits = self.settings.effective_limits().describe(
            registry.enforcement((info.auto_backend,)) if info.auto_backend else None)
        if info.auto_backend:
            self.state.backend = info.auto_backend
            self.state.isolated = info.isolated
            self.state.fallback_reason = None if info.isolated else info.auto_reason
        else:
            self.state.record_blocked(info.auto_reason)
        if not info.isolated and info.require_isolation:
            self.state.record_blocked(info.auto_reason)
