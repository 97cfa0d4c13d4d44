"""Driving the IPython extension in IPython's in-process shell (tests/test_magics_*.py,
tests/security/test_limits.py).

The ``shell`` and ``ip`` fixtures are in tests/conftest.py; these are what the tests say
with them: run a cell, read the status lines and badges, and the expected words.
"""

from __future__ import annotations

import os
import re

SANDBOX_RELEASE = "4.4.0"
HOST_RELEASE = os.uname().release
GREEN, AMBER, RED = "#1a7f37", "#b26b00", "#cf222e"
RUNSC_OK = "[gvisor-magic] runsc (gVisor): exit 0"
STATUS = re.compile(r"^\[gvisor-magic\] .*$", re.M)
OPTIONS = ("--mode", "--timeout", "--workdir", "--repo", "--env", "--network", "--allow-host",
           "--require-isolation", "--out", "--err", "--result", "--no-raise-error", "--quiet")


def history_in_memory(shell) -> None:
    """globalipapp keeps history in a file under the session's temporary directory, which
    conftest removes before IPython's atexit hook writes to it (a noisy sqlite error)."""
    from IPython.core.history import HistoryManager

    old = shell.history_manager
    if old is None or str(old.hist_file) == ":memory:":
        return
    old.end_session()
    old.close()
    shell.history_manager = HistoryManager(shell=shell, parent=shell, hist_file=":memory:")
    if old in shell.configurables:
        shell.configurables[shell.configurables.index(old)] = shell.history_manager


def magics(shell):
    return shell.magics_manager.registry["IsolatedMagics"]


def run(shell, code: str):
    """Run a cell; return its result, or raise what it raised."""
    result = shell.run_cell(code)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result


def status_lines(err: str) -> list[str]:
    return STATUS.findall(err)


def badges(shell) -> list[str]:
    """The ``text/plain`` of every status badge displayed since the last call."""
    outputs = shell.display_pub.outputs
    found = [output["data"]["text/plain"] for output in outputs
             if "gvisor-magic-badge" in output["data"].get("text/html", "")]
    outputs.clear()
    return found
