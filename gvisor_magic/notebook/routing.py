"""Routing IPython's shell escapes (``!cmd``, ``!!cmd``, ``x = !cmd``, ``%sx``) through the runner.

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

HOST_MAGICS = ("pip", "conda", "mamba", "micromamba", "uv")


class BangRouter:
    """Installs and removes the ``system``/``getoutput`` overrides on one shell."""

    def __init__(self, shell: Any, run: Callable[..., Any]) -> None:
        self.shell = shell
        self._run = run  # run(cmd, capture: bool) -> CommandResult
        self._host = threading.local()
        self._wrapped: dict[str, Callable[..., Any]] = {}
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
            magic = self._resolve(name, line_magics[name]) if name in line_magics else None
            if magic is not None:
                self._wrapped[name] = magic
                line_magics[name] = self._on_host(magic)
        self.active = True

    def _resolve(self, name: str, magic: Any) -> Callable[..., Any] | None:
        """The real magic behind a lazy placeholder (IPython 9.x declares %pip lazily).

        A placeholder looks itself up in the table when called, so once wrapped
        it would find the wrapper and recurse forever; and restoring the
        placeholder after it was resolved would break the magic. None: leave it.
        """
        find = getattr(self.shell.magics_manager, "find", None)
        if find is None or type(magic).__name__ != "LazyMagic":
            return magic
        try:
            return find("line", name)
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
