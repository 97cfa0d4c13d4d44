"""Running the host's own tools the way a user would, after a sandbox planted something:
bounded in time, in a process group of their own that is killed whole on a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Every host tool gets this long at most (seconds); its process group is then killed.
TOOL_TIMEOUT = 60


def run_host_tool(argv: Sequence[str], *, cwd: str | Path, env: Mapping[str, str],
                  label: str | None = None, keep: int = 150) -> str:
    """Run ``argv``; how it ended, as evidence: ``LABEL: exit N OUTPUT`` (its last ``keep``
    characters), or ``LABEL: timed out``. ``label`` defaults to the first three words."""
    label = label or " ".join(argv[:3])
    process = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return f"{label}: timed out after {TOOL_TIMEOUT}s"
    text = output.decode(errors="replace").strip()
    return f"{label}: exit {process.returncode} {text[-keep:]}"
