"""The ``jupyter_client`` kernel provisioner of "Python 3 (gVisor)" (``gvisor-provisioner``).

It is ``LocalProvisioner`` with five changes:

- before anything starts, it checks that a runsc sandbox can run here and raises with the
  reason and the fix if not, so the notebook shows why and no kernel runs (fail closed);
- the kernel's five ZMQ sockets are IPC sockets in a private directory (mode 0700, one per
  kernel, named so no other sandbox's mounts show it), which is the only host directory
  besides the notebook's own that the kernel's sandbox may create sockets in; the
  connection file (and its key) is copied there, out of Jupyter's runtime dir, which
  sandboxes never see. The directory is named after the server's pid
  (``run_dirs.py``): if the server is killed, the next run or kernel start of
  the same user removes it;
- the command is ``python -m gvisor_magic.kernel.launch --spec FILE``, which runs the
  kernelspec's own command (ipykernel) inside the sandbox ``FILE`` describes: the
  ``SandboxSpec`` (``to_json``) made here from the settings, the notebook's dir and the
  sockets dir, written beside the kernel's connection file (a hidden file, mode 0600, that
  Jupyter's ``kernel-*.json`` globs never match) and removed as soon as the launcher has
  said whether its sandbox started (it reads the file first), else at ``cleanup``.
  ``launch_kernel`` returns only once the launcher says its sandbox started; if it could
  not (runsc broke since the probe, say), the start fails with the launcher's reason
  instead of handing the notebook a dead kernel, and the next start probes runsc again;
- a kernel shut down leaves nothing, however Jupyter ended it: the launcher removes its
  sandbox when it is asked (shutdown request, SIGTERM), and when Jupyter killed it (SIGKILL,
  ``shutdown_kernel(now=True)`` or a kernel that did not exit within
  ``shutdown_wait_time``), ``cleanup`` kills the sandbox's processes and removes its run
  dir itself (``run_dirs.remove_run_dirs_of``). The launcher is told where to make run
  dirs (``GVISOR_MAGIC_STATE_DIR``), so the provisioner knows where to look;
- a first start of a kernel claims one the server started ahead of need with the same
  recipe, if there is one (``pool.py``), handing the manager that kernel's connection; and
  after every start the pool is asked to keep ``pool`` of that recipe ready.

Settings come from the kernelspec's ``metadata.kernel_provisioner.config`` (see docs/kernel.md,
"A whole kernel in gVisor"): ``network``, ``allow_hosts``, ``limits``, ``protected_paths``,
``writes`` and ``sandbox`` (any other setting by name; ``kernelspec.SETTINGS``), read by
``SandboxSpec.from_options``, and ``pool`` (``kernelspec.OPTIONS``); a bad one stops the
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from tornado.web import HTTPError
from traitlets import Bool, Dict, Int, List, Unicode, Union

from .. import registry
from ..backends.layout import caller_identity
from ..backends.runsc import ENV_STATE_DIR, state_base
from ..errors import InvalidRequestError
from ..request import SandboxSpec
from ..run_dirs import make_kernel_dir, remove_run_dirs_of
from .kernelspec import OPTIONS, SETTINGS, check_config
from .launch import python_path
from .pool import CONNECTION_FILE, POOL, PooledKernel, Recipe
from .starting import EXIT_GRACE, START_TIMEOUT, launcher_cmd, wait_for_start, write_spec


class GvisorKernelUnavailable(HTTPError, RuntimeError):
    """No gVisor kernel can start here. An ``HTTPError``, because that is what
    jupyter_server's API puts in its reply (``APIHandler.write_error``): the notebook then
    shows the reason, not "Unhandled error"."""

    def __init__(self, why: str) -> None:
        # tornado formats log_message with %: a reason is never a format string.
        super().__init__(500, why.replace("%", " percent"),
                         reason="Python 3 (gVisor) cannot start here")


#: Set when a launcher could not start its sandbox: the cached probe is no longer the answer.
_stale_probe = [False]


def unavailable() -> str | None:
    """Why no gVisor kernel can start here, with the fix; None when one can.

    A working probe is cached for the process, so a later start costs nothing; after a
    launcher failed to start its sandbox, the next call probes again."""
    from ..runner import REGISTRY

    refresh, _stale_probe[0] = _stale_probe[0], False
    name = registry.kernel_backend()
    if name is None:
        return "Python 3 (gVisor) cannot start: no backend here can host a gVisor kernel"
    status = REGISTRY.status(name, refresh=refresh)
    if status.available:
        return None
    return (f"Python 3 (gVisor) cannot start: {name} is not usable here ({status.reason})"
            + (f". Fix: {status.fix}" if status.fix else "")
            + ". No kernel was started: this kernel never runs outside gVisor.")


class GvisorProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Starts the kernel inside a gVisor sandbox; refuses where gVisor cannot run."""

    network = Union([Bool(), Unicode(), List(Unicode())], default_value=False,
                    config=True, help="off (False), True (public addresses through the "
                    "filtering proxy), a preset such as 'pypi', hosts, or a list of them")
    allow_hosts = List(Unicode(), config=True, help="hosts added to the network allowlist")
    limits = Dict(config=True, help="limits, e.g. {'memory': '2G', 'max_processes': 256}")
    protected_paths = List(Unicode(), config=True, help="protected-path rules")
    writes = Unicode(None, allow_none=True, config=True,
                     help="what happens to the cells' writes to the working dir: 'auto' (the "
                     "default: they land when the cell ends unless a host tool would run "
                     "them), 'review' (all held) or 'direct'")
    sandbox = Dict(config=True, help="any other sandbox setting by name, e.g. "
                   "{'hostname': 'build'} (see docs/kernel.md)")
    pool = Int(1, config=True, help="kernels of the same settings, working dir and "
               "environment kept started ahead of need in this server, once one has started "
               "(0: none)")

    #: The recipe of this kernel (its pool's key), and the pooled kernel it claims.
    _recipe: Recipe | None = None
    _claimed: PooledKernel | None = None
    #: Whether the running kernel came from the pool.
    from_pool = False

    sockets_dir: str | None = None
    #: The sandbox's ``SandboxSpec`` as JSON, read by the launcher (``write_spec``).
    spec_file: str | None = None
    #: The pipe on which the launcher says whether its sandbox started (read end, write end).
    _ready_pipe: tuple[int, int] | None = None
    #: The running launcher, and where it makes its sandboxes' run dirs.
    _launcher: subprocess.Popen | None = None
    _state_base: str | None = None

    def recipe(self, env: Mapping[str, str] | None, cwd: str | None,
               extra_arguments: Sequence[str] = ()) -> tuple[Recipe, dict[str, str]]:
        """The recipe of a kernel started with ``env`` (None: this process's) in ``cwd``,
        and the environment its launcher gets; ``GvisorKernelUnavailable`` if no kernel of
        these settings can start here. ``pre_launch`` and the server's start
        (``prestart.py``) both make a kernel's recipe with it, so they always agree."""
        why = unavailable()
        if why is not None:
            self.log.error("gvisor: %s", why)
            raise GvisorKernelUnavailable(why)
        try:
            settings = check_config({name: getattr(self, name)
                                     for name in SETTINGS + OPTIONS})
        except (InvalidRequestError, TypeError) as exc:
            why = (f"Python 3 (gVisor) cannot start: bad kernel settings: {exc}. No kernel "
                   "was started: this kernel never runs outside gVisor.")
            self.log.error("gvisor: %s", why)
            raise GvisorKernelUnavailable(why) from None
        given = dict(os.environ if env is None else env)
        # Where the launcher makes its sandboxes' run dirs, said to it: if it is killed,
        # cleanup() removes what it left there.
        base = given.get(ENV_STATE_DIR) or state_base(caller_identity().rootless)[0]
        if base:
            given[ENV_STATE_DIR] = base
        spec = SandboxSpec.from_options({
            "working_dir": os.path.realpath(cwd or os.getcwd()),
            "python_path": python_path(given)}, settings)
        argv = list(self.kernel_spec.argv) if self.kernel_spec is not None else []
        return Recipe.of(spec, [*argv, *extra_arguments], given, base), given

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        self._recipe, kwargs["env"] = self.recipe(
            kwargs.get("env"), kwargs.get("cwd"), kwargs.get("extra_arguments", ()))
        self._state_base = self._recipe.state_base
        spec = self._recipe.spec
        first_start = self.sockets_dir is None
        if first_start and self.pool > 0:
            # One still starting is waited for: it is nearer to ready than a new one.
            self._claimed = await asyncio.get_running_loop().run_in_executor(
                None, POOL.take, self._recipe, START_TIMEOUT)
        if self._claimed is not None:
            self.sockets_dir = self._claimed.sockets_dir
        elif self.sockets_dir is None or not os.path.isdir(self.sockets_dir):
            # Named after this process (the server): when it dies without cleaning up, the
            # next run or kernel start removes what it left (the key, the sockets); this
            # call removes what dead servers left.
            self.sockets_dir = make_kernel_dir()
        if km is not None:
            km.transport = "ipc"
            km.cache_ports = False
            km.ip = os.path.join(self.sockets_dir, "k")
        kwargs = await super().pre_launch(**kwargs)
        inside = os.path.join(self.sockets_dir, "connection.json")
        if self._claimed is None:  # a pooled kernel has a connection file of its own there
            self._copy_connection_file()
        # format_kernel_cmd names the connection file by its real path.
        named = {km.connection_file, os.path.realpath(km.connection_file)} if km else set()
        kwargs["cmd"] = [inside if arg in named else arg for arg in kwargs["cmd"]]
        self._recipe = dataclasses.replace(self._recipe, kernel_cmd=tuple(
            CONNECTION_FILE if arg == inside else arg for arg in kwargs["cmd"]))
        if self._claimed is None:
            self._prepare_launcher(kwargs, dataclasses.replace(
                spec, kernel_dir=self.sockets_dir))
        return kwargs

    def _copy_connection_file(self) -> str:
        """Copy the manager's connection file (and its key) into the kernel's private dir,
        mode 0600: the only copy its sandbox sees. Its path there."""
        assert self.sockets_dir is not None
        inside = os.path.join(self.sockets_dir, "connection.json")
        km = self.parent
        if km is not None and km.connection_file:
            shutil.copyfile(km.connection_file, inside)
            os.chmod(inside, 0o600)
        return inside

    def _prepare_launcher(self, kwargs: dict[str, Any], spec: SandboxSpec) -> None:
        """Make ``kwargs`` start a launcher of ``spec`` running ``kwargs["cmd"]``."""
        km = self.parent
        self._remove_spec_file()
        self.spec_file = write_spec(spec, km.connection_file if km is not None else None)
        self._close_ready_pipe()
        read_end, write_end = os.pipe()
        self._ready_pipe = (read_end, write_end)
        # Only the launcher gets it (Popen's pass_fds): launchers started at the same time
        # by this server do not, so its end closes when the launcher closes it.
        kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), write_end)
        kwargs["cmd"] = launcher_cmd(self.spec_file, write_end, self.kernel_id, kwargs["cmd"])
        self.log.info("gvisor: starting the kernel in a gVisor sandbox (sockets in %s)",
                      self.sockets_dir)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Start the launcher, and return only once its sandbox runs: a launcher that
        cannot start one (runsc broke since it was probed) fails the start with its reason.
        Or claim the pooled kernel ``pre_launch`` took, which runs already."""
        claimed, self._claimed = self._claimed, None
        if claimed is not None:
            why = await asyncio.get_running_loop().run_in_executor(
                None, claimed.claim, self.kernel_id, kwargs.get("env") or {})
            if why is None:
                self.log.info("gvisor: the kernel was started ahead of need (launcher %s, "
                              "%.1f s ago)", claimed.process.pid,
                              time.monotonic() - claimed.since)
                self.process = claimed.process
                self.pid, self._launcher = claimed.process.pid, claimed.process
                with contextlib.suppress(OSError):
                    self.pgid = os.getpgid(self.pid)
                self.cwd = kwargs.get("cwd")
                self.from_pool = True
                # Its own sockets and key: the manager takes them in place of those it
                # wrote (KernelManager._reconcile_connection_info).
                self.connection_info = dict(claimed.connection_info)
                self._refill()
                return self.connection_info
            # Not claimed after all: this start makes a kernel of its own, in a private dir
            # of its own (the pooled one goes, with what it left there).
            self.log.info("gvisor: the kernel started ahead of need cannot be used (%s); "
                          "starting one", why)
            await asyncio.get_running_loop().run_in_executor(None, claimed.shut_down, 5.0)
            assert self._recipe is not None
            self.sockets_dir = make_kernel_dir()
            km = self.parent
            if km is not None:  # its connection file named the pooled kernel's sockets
                km.cleanup_connection_file()
                km.ip = os.path.join(self.sockets_dir, "k")
                km.write_connection_file()
                self.connection_info = km.get_connection_info()
            inside = self._copy_connection_file()
            kwargs["cmd"] = [inside if arg == CONNECTION_FILE else arg
                             for arg in self._recipe.kernel_cmd]
            self._prepare_launcher(kwargs, dataclasses.replace(
                self._recipe.spec, kernel_dir=self.sockets_dir))
            cmd = kwargs.pop("cmd")
        try:
            info = await super().launch_kernel(cmd, **kwargs)
        except BaseException:
            self._close_ready_pipe()
            self._remove_spec_file()
            raise
        assert self._ready_pipe is not None
        read_end, write_end = self._ready_pipe
        os.close(write_end)  # ours: the launcher holds its own copy
        self._ready_pipe = (read_end, -1)
        try:
            why = await asyncio.get_running_loop().run_in_executor(
                None, wait_for_start, read_end, self.process)
        finally:
            self._close_ready_pipe()
            self._remove_spec_file()  # read before the launcher says anything
        if why is None:
            self._launcher = self.process
            self.from_pool = False
            self._refill()
            return info
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()  # no word in time: it must not start later, unseen
            self.process.wait()
            self.process = None  # no kernel: nothing for the manager to signal or wait for
        _stale_probe[0] = True
        message = (f"Python 3 (gVisor) cannot start: its sandbox did not start ({why}). "
                   "No kernel was started: this kernel never runs outside gVisor.")
        self.log.error("gvisor: %s", message)
        self._remove_sockets_dir()
        km = self.parent
        if km is not None and hasattr(km, "cleanup_connection_file"):
            km.cleanup_connection_file()
        raise GvisorKernelUnavailable(message)

    def _refill(self) -> None:
        """After a start: the pool keeps ``pool`` kernels of this recipe ready."""
        if self._recipe is not None and self.pool > 0:
            POOL.fill(self._recipe, self.pool)

    def _close_ready_pipe(self) -> None:
        if self._ready_pipe is not None:
            for fd in self._ready_pipe:
                if fd >= 0:
                    os.close(fd)
            self._ready_pipe = None

    def _remove_sockets_dir(self) -> None:
        if self.sockets_dir is not None:
            shutil.rmtree(self.sockets_dir, ignore_errors=True)
            self.sockets_dir = None

    def _remove_spec_file(self) -> None:
        if self.spec_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec_file)
            self.spec_file = None

    async def cleanup(self, restart: bool = False) -> None:
        claimed, self._claimed = self._claimed, None
        if claimed is not None:  # taken, but the start stopped before its launch
            await asyncio.get_running_loop().run_in_executor(None, claimed.shut_down)
            self.sockets_dir = None
        await super().cleanup(restart=restart)
        self._close_ready_pipe()
        self._remove_spec_file()  # if a start was cut short; a restart writes it again
        await asyncio.get_running_loop().run_in_executor(None, self._reclaim)
        if not restart:
            self._remove_sockets_dir()

    def _reclaim(self) -> None:
        """Remove the sandbox of the launcher that just ended, if it could not (killed)."""
        launcher, self._launcher = self._launcher, None
        if launcher is None or not self._state_base:
            return
        try:
            launcher.wait(timeout=EXIT_GRACE)  # Jupyter's SIGKILL may not have landed yet
        except subprocess.TimeoutExpired:
            self.log.warning("gvisor: the kernel's launcher %s is still running after its "
                             "shutdown; its sandbox is left to it", launcher.pid)
            return
        removed = remove_run_dirs_of(launcher.pid, self._state_base)
        if removed:
            self.log.info("gvisor: the kernel's launcher was killed (status %s); removed its "
                          "sandbox: %s", launcher.returncode, ", ".join(removed))
