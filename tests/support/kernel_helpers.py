"""A real ipykernel for the tests: start it on this venv's Python, run cells, read iopub."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager, start_new_kernel

STARTUP_TIMEOUT = 60.0
# Variables that would change which backend the kernel's runs choose.
GVISOR_ENV = ("GVISOR_MAGIC_MODE", "GVISOR_MAGIC_REQUIRE_ISOLATION", "GVISOR_MAGIC_RUNSC",
              "GVISOR_MAGIC_RUNSC_FLAGS", "GVISOR_MAGIC_DOCKER_RUNTIME", "GVISOR_MAGIC_IMAGE",
              "GVISOR_MAGIC_STATE_DIR")


@dataclass
class Kernel:
    km: KernelManager
    kc: BlockingKernelClient
    cwd: str
    spec_dir: str | None = None
    tmp_dir: str | None = None

    @property
    def pid(self) -> int:
        provisioner = getattr(self.km, "provisioner", None)
        process = getattr(provisioner, "process", None)
        if process is not None:
            return process.pid
        return self.km.kernel.pid  # jupyter_client < 7

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def execute(self, code: str, timeout: float = 60.0,
                on_message: Callable[[Execution, dict], None] | None = None) -> Execution:
        return execute(self.kc, code, timeout=timeout, on_message=on_message)


@dataclass
class Execution:
    """What one execute request produced on iopub (and its shell reply)."""

    code: str
    started: float = field(default_factory=time.monotonic)
    #: (name, text, arrival time) of every stream message, in order.
    streams: list[tuple[str, str, float]] = field(default_factory=list)
    #: (ename, evalue) of every error message.
    errors: list[tuple[str, str]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    #: The data of every display_data message (the status badge is one).
    displays: list[dict[str, Any]] = field(default_factory=list)
    comm_msgs: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] | None = None
    finished: float | None = None

    def text(self, name: str = "stdout") -> str:
        return "".join(text for stream, text, _ in self.streams if stream == name)

    @property
    def stdout(self) -> str:
        return self.text("stdout")

    @property
    def stderr(self) -> str:
        return self.text("stderr")

    def first_arrival(self, name: str, needle: str) -> float | None:
        """When the accumulated ``name`` stream first contained ``needle``."""
        seen = ""
        for stream, text, when in self.streams:
            if stream == name:
                seen += text
                if needle in seen:
                    return when
        return None

    def badges(self) -> list[str]:
        """The ``text/plain`` of each gvisor-magic status badge the cell displayed."""
        return [data["text/plain"] for data in self.displays
                if "gvisor-magic-badge" in data.get("text/html", "")]

    def describe(self) -> str:
        return (f"cell {self.code!r}: stdout={self.stdout!r} stderr={self.stderr[-2000:]!r} "
                f"errors={self.errors!r} reply={(self.reply or {}).get('status')!r}")


def execute(kc: BlockingKernelClient, code: str, timeout: float = 60.0,
            on_message: Callable[[Execution, dict], None] | None = None) -> Execution:
    """Run ``code`` and collect its iopub messages until the kernel is idle again.

    ``on_message(execution, msg)`` sees every message of this request as it
    arrives (after it was recorded), so a test can act in the middle of a cell.
    """
    execution = Execution(code)
    msg_id = kc.execute(code)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the kernel did not finish within {timeout}s: "
                               + execution.describe())
        try:
            msg = kc.get_iopub_msg(timeout=min(remaining, 1.0))
        except queue.Empty:
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            execution.streams.append((content["name"], content["text"], time.monotonic()))
        elif kind == "error":
            execution.errors.append((content["ename"], content["evalue"]))
        elif kind == "execute_result":
            execution.results.append(content["data"])
        elif kind == "display_data":
            execution.displays.append(content["data"])
        elif kind == "comm_msg":
            execution.comm_msgs.append(content)
        if on_message is not None:
            on_message(execution, msg)
        if kind == "status" and content["execution_state"] == "idle":
            execution.finished = time.monotonic()
            break
    while execution.reply is None:
        remaining = max(deadline - time.monotonic(), 5.0)
        msg = kc.get_shell_msg(timeout=remaining)
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            execution.reply = msg["content"]
    return execution


def _kernel_env(tmp_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GVISOR_ENV}
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # quiet debugger warnings on start
    # The kernel keeps a warm sandbox across cells: its state lives in a directory of
    # its own, checked when the kernel stops (not by the per-test leak check).
    env["TMPDIR"] = tmp_dir
    return env


def _spec_runs_this_python(km: KernelManager) -> bool:
    """Whether the "python3" kernelspec would start this venv's interpreter."""
    try:
        argv = km.format_kernel_cmd()
    except Exception:
        return False
    exe = shutil.which(argv[0]) if argv else None
    # Not realpath: a venv's python is a symlink to the system one.
    return exe is not None and os.path.abspath(exe) == os.path.abspath(sys.executable)


def start_kernel(cwd: str) -> Kernel:
    """A kernel running this venv's Python in ``cwd``, ready for requests."""
    tmp_dir = tempfile.mkdtemp(prefix="gvm-kernel-", dir="/tmp")
    env = _kernel_env(tmp_dir)
    if _spec_runs_this_python(KernelManager(kernel_name="python3")):
        km, kc = start_new_kernel(startup_timeout=STARTUP_TIMEOUT, kernel_name="python3",
                                  cwd=cwd, env=env)
        kernel = Kernel(km, kc, cwd, tmp_dir=tmp_dir)
    else:  # a kernelspec of our own that names sys.executable explicitly
        spec_dir = tempfile.mkdtemp(prefix="gvm-kernelspec-")
        os.makedirs(os.path.join(spec_dir, "gvm-python"))
        with open(os.path.join(spec_dir, "gvm-python", "kernel.json"), "w") as handle:
            json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                "{connection_file}"],
                       "display_name": "gvisor-magic tests", "language": "python"}, handle)
        km = KernelManager(kernel_name="gvm-python",
                           kernel_spec_manager=KernelSpecManager(kernel_dirs=[spec_dir]))
        km.start_kernel(cwd=cwd, env=env)
        kc = km.client()
        kc.start_channels()
        kernel = Kernel(km, kc, cwd, spec_dir, tmp_dir)
        try:
            kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        except RuntimeError:
            stop_kernel(kernel)
            raise
    try:
        check = kernel.execute("import sys; print(sys.prefix)", timeout=30)
        assert check.stdout.strip() == sys.prefix, check.describe()
    except BaseException:
        stop_kernel(kernel)
        raise
    return kernel


def stop_kernel(kernel: Kernel) -> None:
    """Shut the kernel down and make sure neither it nor anything it started is left."""
    try:
        pid = kernel.pid
        family = [psutil.Process(pid), *kernel.descendants()]
    except (psutil.Error, AttributeError):
        family = []
    try:
        kernel.kc.stop_channels()
    finally:
        # A graceful shutdown, as Jupyter does: the kernel closes its warm sandbox.
        kernel.km.shutdown_kernel(now=False)
        if kernel.spec_dir is not None:
            shutil.rmtree(kernel.spec_dir, ignore_errors=True)
    _, alive = psutil.wait_procs(family, timeout=10)
    for process in alive:  # the test fails below; do not leave them running meanwhile
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not alive, f"kernel processes left after shutdown: {alive}"
    if kernel.tmp_dir is not None:
        left = os.listdir(kernel.tmp_dir)
        shutil.rmtree(kernel.tmp_dir, ignore_errors=True)
        assert not [name for name in left if name.startswith("gvisor-magic-")], left
