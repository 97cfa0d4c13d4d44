"""``%%isolated``, ``%isolated`` and ``%isolation``: thin IPython faces over the runner.

Like ``%%bash`` (IPython's ``script.py``), output streams live into the cell,
a non-zero exit raises ``CalledProcessError`` (unless ``--no-raise-error``) and
``_exit_code`` is set; unlike it, the command runs under gVisor when it can,
and every run says where it ran: quietly (a one-line badge) when it went as asked,
on stderr when something needs attention (see ``status``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from IPython.utils.text import DollarFormatter, SList
from traitlets import Bool, Dict, Float, Int, List, TraitError, Unicode, Union, validate
from traitlets.config import Config, Configurable

from .. import registry
from ..egress.policy import NetworkPolicy
from ..errors import CommandInterrupted, InvalidRequestError, IsolationUnavailable
from ..request import (
    MODES,
    WRITES,
    Limits,
    SandboxSpec,
    named_settings,
    parse_pairs,
)
from ..result import CommandResult
from ..runner import detect_environment, run_command_isolated
from ..writes import HeldChanges
from .kernel_session import KernelSessions
from .review import review_widget
from .routing import SCRIPT_OPTIONS_REFUSED, ShellRouter
from .status import report
from .widget import VIEWS, IsolationState, make_widget


class StreamedSList(SList):
    """The lines of a command whose output was already shown while it ran.

    ``%isolated ls`` streams like ``!ls``; returning a plain SList would then
    print everything a second time, so this one displays nothing itself.
    ``files = %isolated ls`` still gets every line.
    """

    def _ipython_display_(self) -> None:
        return None


#: The options of ``%%isolated`` and ``%isolated`` (one table: both faces take the same).
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--mode", {"choices": MODES, "help": "backend for this command"}),
    ("--timeout", {"type": float, "help": "seconds (default: Isolation.timeout)"}),
    ("--workdir", {"help": "host directory mounted read-write as the cwd "
                           "(default: the kernel's current directory)"}),
    ("--repo", {"help": "host directory mounted read-only at the same path"}),
    ("--env", {"action": "append", "default": [], "metavar": "KEY=VALUE",
               "help": "environment variable for the command (repeatable)"}),
    ("--network", {"metavar": "POLICY", "nargs": "?", "const": "public",
                   "help": "the sandbox's network: a preset (pypi, npm, github, huggingface, "
                           "conda), hosts (comma-separated host or host:port), 'public' "
                           "(public addresses through the host's filtering proxy; what "
                           "--network alone means), 'host' (the host's own network, "
                           "unfiltered) or 'off' (default: Isolation.network)"}),
    ("--allow-host", {"action": "append", "default": [], "metavar": "HOST[:PORT]",
                      "help": "also allow this destination (repeatable)"}),
    ("--require-isolation", {"action": "store_true",
                             "help": "raise IsolationUnavailable rather than run without gVisor"}),
    ("--out", {"metavar": "VAR", "help": "store stdout in VAR instead of printing it"}),
    ("--err", {"metavar": "VAR", "help": "store stderr in VAR instead of printing it"}),
    ("--result", {"metavar": "VAR", "help": "store the CommandResult in VAR"}),
    ("--no-raise-error", {"action": "store_true",
                          "help": "do not raise CalledProcessError on a non-zero exit"}),
    ("--quiet", {"action": "store_true", "help": "no status badge (warnings are still shown)"}),
    ("--fresh", {"action": "store_true",
                 "help": "run in a fresh one-shot sandbox instead of the kernel's warm one"}),
    ("--limit", {"action": "append", "default": [], "metavar": "NAME=VALUE",
                 "help": "resource limit, e.g. memory=1G, max_processes=64, tmp_size=2G, "
                         "cpus=1 (repeatable; see Isolation.limits)"}),
    ("--writes", {"choices": WRITES,
                  "help": "what happens to the command's writes to the working dir: 'auto' "
                          "(land unless a host tool would run them; those are held for "
                          "review), 'review' (all held), 'direct' (land as made; default: "
                          "Isolation.writes, else auto where gVisor runs)"}),
    ("--set", {"action": "append", "default": [], "metavar": "NAME=VALUE",
               "help": "any other sandbox setting by name, e.g. hostname=build "
                       "(repeatable; see Isolation.sandbox)"}),
)
#: Options that take a value (the line magic reads them off the front of its line).
_TAKES_VALUE = frozenset(flag for flag, spec in OPTIONS if spec.get("action") != "store_true")
#: Of those, the ones whose value may be left out (``--network`` alone is ``public``): an
#: option or ``--`` right after one is not its value.
_OPTIONAL_VALUE = frozenset(flag for flag, spec in OPTIONS if spec.get("nargs") == "?")


def _with_options(magic: Callable) -> Callable:
    for flag, spec in reversed(OPTIONS):
        magic = argument(flag, **spec)(magic)
    return magic


def split_options(line: str) -> tuple[list[str], str]:
    """``--mode docker --timeout 5 ls -l | wc`` -> (the option tokens, ``ls -l | wc``).

    Options come first, as with ``%timeit -n 10 ...``; the command starts at the first
    word that is not an option or an option's value (or after ``--``), and is kept as
    written: quotes, pipes and all. ``--network`` may go without its value when an
    option or ``--`` follows (``%isolated --network -- curl ...``).
    """
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    tokens: list[str] = []
    wants_value = False
    while True:
        start = lexer.instream.tell()
        try:
            token = lexer.get_token()
        except ValueError:  # unbalanced quotes: not an option, so the command starts here
            return tokens, line[start:].strip()
        if token is None or token == lexer.eof:
            return tokens, ""
        if wants_value and not (tokens[-1] in _OPTIONAL_VALUE and token.startswith("-")):
            tokens.append(token)
            wants_value = False
        elif token == "--":
            return tokens, line[lexer.instream.tell():].strip()
        elif token.startswith("-"):
            tokens.append(token)
            wants_value = token in _TAKES_VALUE
        else:
            return tokens, line[start:].strip()


def _default_shell() -> str:
    return shutil.which("bash") or "/bin/sh"


#: The settings of ``Isolation`` that make its sandbox (``Isolation.spec``).
SANDBOX_SETTINGS = ("network", "limits", "protected_paths", "shell", "writes")


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
    network = Union([Bool(), Unicode(), List(Unicode())], default_value=False,
                    help="The sandbox's network: False (off), a preset ('pypi', 'npm', "
                    "'github', 'huggingface', 'conda'), hosts (['pypi.org', "
                    "'example.com:8443']), True (public addresses through the host's filtering "
                    "proxy) or 'host' (the host's own network, unfiltered).").tag(config=True)
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
    writes = Unicode(None, allow_none=True, help="What happens to a command's writes to the "
                     "working dir: 'auto' (they land unless a host tool would run or load "
                     "them; those are held for review: %isolation apply), 'review' (all held), "
                     "'direct' (they land as made). None: auto where gVisor runs, direct where "
                     "writes cannot be held (the subprocess backend), as each result says."
                     ).tag(config=True)
    sandbox = Dict(help="Any other sandbox setting by name, e.g. {'hostname': 'build'} "
                   "(the names of SandboxSpec.from_options; see docs/api.md).").tag(config=True)

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

    @validate("network", "limits", "protected_paths", "sandbox", "writes")  # shell: below
    def _check_sandbox_setting(self, proposal):
        name = proposal["trait"].name
        try:
            SandboxSpec.from_options(named_settings(proposal["value"], "Isolation.sandbox")
                                     if name == "sandbox" else {name: proposal["value"]})
        except (InvalidRequestError, TypeError) as exc:
            text = str(exc)  # "network: ..." and "limits.memory: ..." name it already
            raise TraitError(f"Isolation.{text}" if text.startswith(name)
                             else f"Isolation.{name}: {text}") from None
        return proposal["value"]

    def spec(self, options: Mapping[str, object] | None = None) -> SandboxSpec:
        """The sandbox of these settings, then ``options`` over them (a cell's, named as
        ``SandboxSpec.from_options`` names them)."""
        own = SandboxSpec.from_options({**self.sandbox, **{
            name: getattr(self, name) for name in SANDBOX_SETTINGS}})
        return SandboxSpec.from_options(options or {}, own)

    def network_policy(self) -> NetworkPolicy:
        return self.spec().network

    def effective_limits(self, overrides: Mapping[str, str] | None = None) -> Limits:
        """The defaults, then ``Isolation.limits``, then a cell's ``--limit`` options."""
        return self.spec({"limits": overrides}).limits

    @validate("shell")
    def _check_shell(self, proposal):
        value = proposal["value"]
        if not os.path.isabs(value) or not os.access(value, os.X_OK):
            raise TraitError(f"Isolation.shell must be an executable absolute path, "
                             f"not {value!r}")
        return value



# Said on stdout: they are answers to what the user asked, not errors (stderr is red).
ROUTED_MESSAGE = (
    "[gvisor-magic] routing on.\n"
    "  In the sandbox: !cmd, !!cmd, x = !cmd, %sx, and the script cells %%bash, %%sh,\n"
    "                  %%script PROGRAM and its kin (%%python3, %%perl, %%ruby, ...: the\n"
    "                  program runs in the sandbox and reads the cell, as on the host).\n"
    "  On the host:    %pip, %conda, %mamba, %micromamba, %uv, other magics, and Python\n"
    "                  code itself (subprocess, os.system, ...).\n"
    f"  Refused:        script-cell options {' and '.join(SCRIPT_OPTIONS_REFUSED)} (they hand "
    "back a host process).")
UNROUTED_MESSAGE = ("[gvisor-magic] routing off: !, !!, %sx and the script cells (%%bash, "
                    "%%sh, %%script, ...) run on the host again.")


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
        self.router = ShellRouter(shell, self._run_routed, self._run_script_cell)
        self.sessions = KernelSessions()
        #: Writes held for review by this kernel's commands (``%isolation apply``).
        self.held = HeldChanges()
        self.settings.observe(self._route_changed, names="route_bang")
        if self.settings.route_bang:
            self.router.install()
        if self.settings.warm_session and self.settings.prewarm:
            self.sessions.prewarm(self.spec(), self.settings.mode,
                                  self.settings.require_isolation)

    def spec(self, options: Mapping[str, object] | None = None) -> SandboxSpec:
        """The sandbox a command runs in: ``Isolation``'s settings, then a cell's
        ``options`` (``working_dir``, ``network``... as ``SandboxSpec.from_options`` reads
        them), in the kernel's current directory unless they name another."""
        options = dict(options or {})
        options["working_dir"] = options.get("working_dir") or os.getcwd()
        return self.settings.spec(options)

    def _route_changed(self, change) -> None:
        if change["new"]:
            self.router.install()
        else:
            self.router.uninstall()

    # -- the one place that runs things ----------------------------------------------

    def run(self, command: str | Sequence[str], *, capture: bool = False,
            quiet: bool | None = None, stdin: str | None = None,
            mode: str | None = None, timeout: float | str | None = "trait",
            spec: SandboxSpec | None = None, env: dict[str, str] | None = None,
            require_isolation: bool | None = None, show_stdout: bool = True,
            show_stderr: bool = True, fresh: bool = False) -> CommandResult:
        """Run ``command`` (a shell script, or an argv) in ``spec`` (default: ``self.spec()``),
        stream it, record it in the widget."""

        def stream(name: str, text: str) -> None:
            if capture or (name == "stdout" and not show_stdout) or (
                    name == "stderr" and not show_stderr):
                return
            target = sys.stdout if name == "stdout" else sys.stderr
            target.write(text)
            target.flush()

        settings = self.settings
        # A cell that picks another backend (or requirement) says nothing about the
        # kernel's default.
        own_choice = mode not in (None, settings.mode) or require_isolation not in (
            None, settings.require_isolation)
        require = settings.require_isolation if require_isolation is None else require_isolation
        seconds = settings.timeout if timeout == "trait" else timeout
        try:
            spec = spec or self.spec()
            # A cell that names another backend runs one-shot there: the kernel's warm
            # sandbox (its /tmp, HOME) stays for the cells that follow.
            if settings.warm_session and not fresh and mode in (None, settings.mode):
                session = self.sessions.get(spec, mode or settings.mode, require)
                self.state.session = "starting" if session.state == "stopped" else None
                result = session.run(command, timeout=seconds, env=env, on_output=stream,
                                     stdin=stdin, max_output=settings.max_output)
            else:
                result = run_command_isolated(
                    command, spec, timeout=seconds, env=env, mode=mode or settings.mode,
                    require_isolation=require, on_output=stream, stdin=stdin,
                    max_output=settings.max_output)
        except IsolationUnavailable as exc:
            self.state.record_blocked(str(exc).splitlines()[0], own_choice=own_choice)
            VIEWS.refresh(self.state)
            raise
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
        except CommandInterrupted as exc:
            self.state.record(exc.result, outcome="interrupted", own_choice=own_choice)
            VIEWS.refresh(self.state)
            report(exc.result, self._quiet(quiet), "interrupted")
            raise
        self.state.record(result, own_choice=own_choice)
        self.state.network = settings.network_policy().describe()
        if not own_choice:
            self.state.limits = settings.effective_limits().describe(
                registry.enforcement((result.backend,)))
            self.state.session = self.sessions.describe() if settings.warm_session else \
                "off (a fresh sandbox per command)"
        VIEWS.refresh(self.state)
        report(result, self._quiet(quiet))
        if result.held:
            self.held.add(result.writes)
            display(review_widget(result.writes, self.held))
        return result

    def _quiet(self, quiet: bool | None) -> bool:
        return self.settings.quiet if quiet is None else quiet

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

    def _run_script_cell(self, argv: list[str], cell: str, out: str | None,
                         err: str | None, raise_error: bool) -> None:
        """A routed ``%%bash``/``%%script X`` cell: ``argv`` reads the cell on stdin, as
        IPython runs it on the host; ``--out``/``--err``/``--no-raise-error`` as there."""
        result = self.run(argv, stdin=cell if cell.endswith("\n") else cell + "\n",
                          show_stdout=not out, show_stderr=not err)
        self._store(result, out=out, err=err)
        if not result.success and raise_error:
            raise subprocess.CalledProcessError(result.returncode, " ".join(argv),
                                                result.stdout, result.stderr)

    def _store(self, result: CommandResult, out: str | None = None, err: str | None = None,
               keep: str | None = None) -> None:
        namespace = self.shell.user_ns
        namespace["_exit_code"] = result.returncode
        for name, value in ((out, result.stdout), (err, result.stderr), (keep, result)):
            if name:
                namespace[name] = value

    def _run_with(self, args: Any, command: str, *, capture: bool = False) -> CommandResult:
        """Run ``command`` with the parsed options of either face of ``isolated``."""
        try:
            env = parse_pairs(args.env, "--env")
            limits = parse_pairs(args.limit, "--limit", form="NAME=VALUE")
            named = named_settings(parse_pairs(args.set, "--set", form="NAME=VALUE"), "--set")
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
        if args.timeout is not None and not args.timeout > 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
        for option in ("workdir", "repo"):
            path = getattr(args, option)
            if path and not os.path.isdir(path):
                raise UsageError(f"--{option}: {path!r} is not a directory")
        for option in ("out", "err", "result"):
            name = getattr(args, option)
            if name and not name.isidentifier():
                raise UsageError(f"--{option} expects a variable name, got {name!r}")
        try:
            spec = self.spec({**named, "working_dir": args.workdir, "repo_path": args.repo,
                              "network": args.network, "allow_hosts": args.allow_host,
                              "limits": limits, "writes": args.writes})
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
        result = self.run(
            command, capture=capture, mode=args.mode,
            timeout=args.timeout if args.timeout is not None else "trait",
            spec=spec, env=env,
            require_isolation=True if args.require_isolation else None, fresh=args.fresh,
            quiet=True if args.quiet else None,
            show_stdout=not args.out, show_stderr=not args.err)
        self._store(result, out=args.out, err=args.err, keep=args.result)
        return result

    # -- magics -------------------------------------------------------------------------

    @magic_arguments()
    @_with_options
    @cell_magic("isolated")
    def magic_isolated(self, line: str, cell: str) -> None:
        """Run the cell as a shell script in a gVisor sandbox.

        Output streams live; a non-zero exit raises CalledProcessError, as with %%bash.
        ``$var`` and ``{expr}`` are expanded in the options and the body, as with ``!``.
        """
        args = parse_argstring(self.magic_isolated, line)
        body = self.expand(cell)
        result = self._run_with(args, body)
        if not result.success and not args.no_raise_error:
            raise subprocess.CalledProcessError(result.returncode, body, result.stdout,
                                                result.stderr)

    @magic_arguments()
    @_with_options
    @line_magic("isolated")
    def isolated(self, line: str) -> SList | None:
        """``%isolated [options] COMMAND``: like ``!COMMAND``, in the sandbox.

        Options come before the command, as with ``%timeit``:
        ``%isolated --mode docker --timeout 5 ls``; ``files = %isolated --quiet ls`` gets the
        output lines as an SList (shown once, as it streams). A non-zero exit sets
        ``_exit_code`` and does not raise, as with ``!``.
        """
        tokens, command = split_options(line)
        if not command:
            taken = (f" ({tokens[-1]!r} was read as {tokens[-2]}'s value: write "
                     f"{tokens[-2]} -- COMMAND to leave it out)"
                     if len(tokens) > 1 and tokens[-2] in _OPTIONAL_VALUE else "")
            raise UsageError("%isolated needs a command: %isolated [options] COMMAND "
                             f"(see %isolated?){taken}")
        args = parse_argstring(self.isolated, " ".join(shlex.quote(t) for t in tokens))
        result = self._run_with(args, command)
        if args.out:
            return None
        return StreamedSList(result.stdout.splitlines())

    @line_magic
    def isolation(self, line: str):
        """``%isolation on|off|status|restart``: route ``!``, show the status, or replace
        the kernel's warm sandbox. ``%isolation apply PATH...|--all`` and ``%isolation
        discard [PATH...]`` act on the writes held for review."""
        words = shlex.split(line) or ["status"]
        action = words[0]
        if action in ("apply", "discard"):
            return self._held_verb(action, words[1:])
        if len(words) > 1:
            raise UsageError(f"%isolation {action} takes no arguments (got {line.strip()!r})")
        if action == "on":
            self.settings.route_bang = True
            print(ROUTED_MESSAGE)
        elif action == "off":
            self.settings.route_bang = False
            print(UNROUTED_MESSAGE)
        elif action == "status":
            return self.status_widget()
        elif action == "restart":
            self.sessions.restart()
            self.state.session = self.sessions.describe()
            VIEWS.refresh(self.state)
            print("[gvisor-magic] the warm sandbox was replaced (fresh /tmp and HOME)")
        else:
            raise UsageError(f"unknown %isolation verb {action!r}: use "
                             "%isolation on|off|status|restart|apply|discard")
        return None

    def _held_verb(self, action: str, words: list[str]) -> None:
        if action == "apply" and not words:
            raise UsageError("%isolation apply takes the paths to apply (relative to the "
                             "working dir), or --all")
        every = words == ["--all"]
        if not self.held.pending():
            print("[gvisor-magic] no writes are held for review")
            return
        verb = self.held.apply if action == "apply" else self.held.discard
        for line in verb(None if every or not words else words):
            print(f"[gvisor-magic] {line}")
        left = len(self.held.pending())
        if left:
            print(f"[gvisor-magic] {left} change(s) still held")

    def status_widget(self):
        """A live status widget (refreshed after every run in this kernel)."""
        if self.state.last is None and self.state.backend == "unknown":
            self.refresh_environment()
        return make_widget(self.state)

    def refresh_environment(self) -> None:
        info = detect_environment(mode=self.settings.mode,
                                  require_isolation=self.settings.require_isolation)
        self.state.session = self.sessions.describe()
        default = info.backends.get(info.auto_backend)
        self.state.version = default.version if default is not None else None
        self.state.require_isolation = info.require_isolation
        self.state.network = self.settings.network_policy().describe()
        self.state.pod_gvisor = info.pod_runs_gvisor
        spec = self.spec()
        self.state.writes = (
            f"{spec.writes_mode}: what a host tool would run is held for review"
            if spec.holds_writes and spec.writes_mode == "auto" and info.isolated else
            f"{spec.writes_mode}: every change is held for review"
            if spec.holds_writes and info.isolated else
            "direct: they land as made" if spec.writes_mode == "direct" else
            f"{spec.writes}: refused, {info.auto_backend or 'the host'} cannot hold writes"
            if spec.writes else
            f"direct: {info.auto_backend or 'the host'} cannot hold writes")
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
