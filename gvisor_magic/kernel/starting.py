"""Starting a kernel's launcher (``launch.py``), as the provisioner does for a kernel asked
for and the pool for one started ahead of need: its command line, the file its sandbox is
described in, and waiting for its word on whether that sandbox started."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import tempfile
import time

from ..request import SandboxSpec

#: How long the launcher may take to start its sandbox before the start counts as failed
#: (a sandbox starts in well under a second here; a loaded machine may take several).
START_TIMEOUT = 180.0
#: What the launcher writes on its ``--ready-fd`` once its sandbox runs.
READY = b"ok\n"
#: How long a launcher that failed may take to exit before it is killed.
EXIT_GRACE = 10.0
#: How long a launcher that closed its pipe without READY is given to exit, for its status.
CLOSED_GRACE = 1.0


def launcher_cmd(spec_file: str, ready_fd: int, kernel_id: str | None,
                 kernel_cmd: list[str], claim_fd: int | None = None) -> list[str]:
    """The launcher's command line (``launch.py``) for the kernel command ``kernel_cmd``."""
    return [sys.executable, "-m", "gvisor_magic.kernel.launch", "--spec", spec_file,
            "--ready-fd", str(ready_fd),
            *(["--kernel-id", kernel_id] if kernel_id else []),
            *(["--claim-fd", str(claim_fd)] if claim_fd is not None else []),
            "--", *kernel_cmd]


def wait_for_start(fd: int, process: subprocess.Popen, timeout: float = START_TIMEOUT
                   ) -> str | None:
    """Wait until the launcher reports on ``fd``: None once its sandbox runs, else why not.

    The launcher writes ``READY``, or its reason and exits. Its exit (or a closed pipe)
    without ``READY`` is a failure too; so is no word within ``timeout`` seconds.
    """
    data, closed = b"", False
    deadline = time.monotonic() + timeout
    while not data.startswith(READY):
        if len(data) >= len(READY) and not READY.startswith(data):
            break  # a reason, not READY: read it to the end below
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return f"no word from its launcher within {timeout:.0f}s"
        # The process is polled too, in case something it started kept the write end.
        readable, _, _ = select.select([fd], [], [], min(remaining, 0.25))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                closed = True
                break
            data += chunk
        elif process.poll() is not None:
            break
    else:
        return None
    # It exits once it has said why. With its pipe closed, everything it said is here
    # already: the wait is only for its exit status, which follows at once if it is dying.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=CLOSED_GRACE if closed else EXIT_GRACE)
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    reason = data.decode("utf-8", "replace").strip()
    code = process.poll()
    if not reason:
        reason = (f"its launcher exited with status {code}" if code is not None
                  else "its launcher said nothing")
    return reason


def write_spec(spec: SandboxSpec, connection_file: str | None) -> str:
    """Write ``spec`` as JSON (mode 0600) beside ``connection_file``, named after it
    (``.kernel-ID.sandbox.json``), else in the temporary dir; its path."""
    if not connection_file:
        fd, path = tempfile.mkstemp(prefix=".gvisor-kernel-", suffix=".sandbox.json")
    else:
        stem = os.path.basename(connection_file).removesuffix(".json")
        path = os.path.join(os.path.dirname(connection_file), f".{stem}.sandbox.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a restart's: made again, never written through
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(spec.to_json())
    return path
