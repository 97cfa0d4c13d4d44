"""Routing IPython's shell escapes through the runner while ``%isolation on``.

Routed: ``!cmd``, ``!!cmd``, ``x = !cmd``, ``%sx``, and the script cells of IPython's
``ScriptMagics`` (``%%bash``, ``%%sh``, ``%%script PROGRAM`` and the ``%%python3``,
``%%perl``, ``%%ruby``... it generates): each of those starts a program that reads the
cell on stdin, and here that program starts in the sandbox instead. Their ``--out``,
``--err`` and ``--no-raise-error`` behave as on the host; ``--bg`` and ``--proc`` hand
back a live host process, which a sandboxed run cannot be, so they are refused with a
``UsageError`` (``%isolation off`` runs them on the host).

IPython compiles ``!cmd`` to ``get_ipython().system(cmd)`` and ``x = !cmd`` to
``get_ipython().getoutput(cmd)``; the sanctioned hook is to rebind those two
methods on the shell *instance* (ipykernel rebinds ``system`` on its class),
and removing the instance attributes restores the originals exactly (an
instance-level override that was there before, such as IPython's test shell's,
is put back).

Package managers stay on the host: ``%pip``, ``%conda``, ``%mamba``,
``%micromamba`` and ``%uv`` also call ``shell.system``, so while routing is on
they are wrapped to mark their calls as host calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.utils.process import arg_split

HOST_MAGICS = ("pip", "conda", "mamba", "micromamba", "uv")
#: Script-cell options that cannot be honoured in a sandbox (they return a host process).
SCRIPT_OPTIONS_REFUSED = ("--bg", "--proc")


class ShellRouter:
    """Installs and removes the routing on one shell: ``system``/``getoutput`` overrides,
    and wrappers around the script cell magics."""

    def __init__(self, shell: Any, run: Callable[..., Any],
                 run_script: Callable[..., Any] | None = None) -> None:
        self.shell = shell
        self._run = run  # run(cmd, capture: bool) -> CommandResult
        # run_script(argv, cell, out, err, raise_error) -> None
        self._run_script = run_script
        self._host = threading.local()
        self._wrapped: dict[str, Callable[..., Any]] = {}
        self._wrapped_cells: dict[str, Callable[..., Any]] = {}
        #: ``system``/``getoutput`` bound on the instance before we were installed.
        self._previous: dict[str, Any] = {}
        self.active = False

    # -- on/off ---------------------------------------------------------------

    def install(self) -> None:
        if self.active:
            return
        self._previous = {name: self.shell.__dict__[name] for name in ("system", "getoutput")
                          if name in self.shell.__dict__}
        self.shell.system = self.system
        self.shell.getoutput = self.getoutput
        line_magics = self.shell.magics_manager.magics["line"]
        for name in HOST_MAGICS:
            magic = self._resolve("line", name, line_magics[name]) if name in line_magics else None
            if magic is not None:
                self._wrapped[name] = magic
                line_magics[name] = self._on_host(magic)
        if self._run_script is not None:
            self._wrap_script_cells()
        self.active = True

    def _script_magics(self) -> Any:
        """IPython's ``ScriptMagics`` instance (declared lazily in IPython 9), or None."""
        manager = self.shell.magics_manager
        cells = manager.magics["cell"]
        if "script" in cells:
            self._resolve("cell", "script", cells["script"])
        return manager.registry.get("ScriptMagics")

    def _wrap_script_cells(self) -> None:
        script = self._script_magics()
        if script is None:
            return
        cells = self.shell.magics_manager.magics["cell"]
        parser = script.shebang.parser
        for name in ("script", *script.script_magics):
            magic = self._resolve("cell", name, cells[name]) if name in cells else None
            if magic is None:
                continue
            program = None if name == "script" else script.script_paths.get(name, name)
            self._wrapped_cells[name] = magic
            cells[name] = self._routed_script(name, program, magic, parser)

    def _routed_script(self, name: str, program: str | None, original: Callable[..., Any],
                       parser: Any) -> Callable[..., Any]:
        def routed(line: str, cell: str) -> Any:
            if self._on_host_now():
                return original(line, cell)
            full = f"{program} {line}".strip() if program else line
            args, argv = parser.parse_known_args(arg_split(full, posix=True))
            refused = [flag for flag, given in (("--bg", args.bg), ("--proc", args.proc))
                       if given]
            if refused:
                raise UsageError(
                    f"%%{name} {' '.join(refused)}: a background process on the host cannot "
                    "be handed back from the sandbox. Drop the option, or run the cell on "
                    "the host with %isolation off.")
            if not argv:
                raise UsageError("%%script needs a program: %%script bash (or %%bash)")
            return self._run_script(argv, cell, args.out, args.err, args.raise_error)

        routed.__doc__ = original.__doc__
        routed.__wrapped__ = original  # type: ignore[attr-defined]
        return routed

    def _resolve(self, kind: str, name: str, magic: Any) -> Callable[..., Any] | None:
        """The real magic behind a lazy placeholder (IPython 9.x declares %pip and the
        script cells lazily).

        A placeholder looks itself up in the table when called, so once wrapped
        it would find the wrapper and recurse forever; and restoring the
        placeholder after it was resolved would break the magic. None: leave it.
        """
        find = getattr(self.shell.magics_manager, "find", None)
        if find is None or type(magic).__name__ != "LazyMagic":
            return magic
        try:
            return find(kind, name)
        except Exception:  # a broken provider: the untouched placeholder reports it
            return None

    def uninstall(self) -> None:
        if not self.active:
            return
        for attribute in ("system", "getoutput"):
            self.shell.__dict__.pop(attribute, None)
            if attribute in self._previous:
                self.shell.__dict__[attribute] = self._previous[attribute]
        self._previous = {}
        line_magics = self.shell.magics_manager.magics["line"]
        for name, original in self._wrapped.items():
            line_magics[name] = original
        self._wrapped.clear()
        cell_magics = self.shell.magics_manager.magics["cell"]
        for name, original in self._wrapped_cells.items():
            cell_magics[name] = original
        self._wrapped_cells.clear()
        self.active = False

    def _on_host(self, magic: Callable[..., Any]) -> Callable[..., Any]:
        def host_magic(*args: Any, **kwargs: Any) -> Any:
            self._host.depth = getattr(self._host, "depth", 0) + 1
            try:
                return magic(*args, **kwargs)
            finally:
                self._host.depth -= 1

        host_magic.__doc__ = magic.__doc__
        host_magic.__wrapped__ = magic  # type: ignore[attr-defined]
        return host_magic

    def _on_host_now(self) -> bool:
        return getattr(self._host, "depth", 0) > 0

    def _host_method(self, name: str) -> Callable[..., Any]:
        """The shell's own ``system``/``getoutput``, as it was before routing."""
        previous = self._previous.get(name)
        return previous if previous is not None else getattr(type(self.shell), name).__get__(
            self.shell)

    # -- the overrides ------------------------------------------------------------

    def system(self, cmd: str) -> None:
        """``!cmd``: stream the output, set ``_exit_code``, return None (as IPython does)."""
        if self._on_host_now():
            return self._host_method("system")(cmd)
        expanded = self.shell.var_expand(cmd, depth=1)
        result = self._run(expanded, capture=False)
        self.shell.user_ns["_exit_code"] = result.returncode
        if getattr(self.shell, "system_raise_on_error", False) and result.returncode != 0:
            from subprocess import CalledProcessError

            raise CalledProcessError(result.returncode, cmd)
        return None

    def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> Any:
        """``x = !cmd`` / ``!!cmd``: stdout and stderr together, as an ``SList``."""
        if self._on_host_now():
            return self._host_method("getoutput")(cmd, split=split, depth=depth + 1)
        from IPython.utils.text import LSString, SList

        expanded = self.shell.var_expand(cmd, depth=depth + 1)
        result = self._run(expanded, capture=True)
        self.shell.user_ns["_exit_code"] = result.returncode
        if getattr(self.shell, "system_raise_on_error", False) and result.returncode != 0:
            from subprocess import CalledProcessError

            raise CalledProcessError(result.returncode, cmd)
        combined = result.stdout + result.stderr
        return SList(combined.splitlines()) if split else LSString(combined)
