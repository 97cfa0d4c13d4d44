"""The one-shot sandbox's init (``sandboxed/sandbox_init.py``) from the host's side, for every
backend that uses it: the argv that starts it, whether it recorded the command's start, and
the status it reported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .layout import STATUS_DIR, init_python

_SANDBOXED = Path(__file__).resolve().parent.parent / "sandboxed"
#: The relay defines names only; the init, after it, uses them (see sandbox_init).
RELAY_SOURCE = (_SANDBOXED / "egress_relay.py").read_text()
_INIT_SOURCE = "\n".join((RELAY_SOURCE, (_SANDBOXED / "cow_layer.py").read_text(),
                          (_SANDBOXED / "sandbox_init.py").read_text()))
_ATTEMPTS_MAX = 16 * 1024


#: How long after its timeout a sandbox ends itself if its caller did not (a dead caller).
DEADLINE_GRACE = 5.0


def init_argv(marker: str, argv: tuple[str, ...], timeout: float | None = None,
              egress: str = "", layer: str = "") -> list[str]:
    """The sandbox's PID 1: our init (see sandboxed/sandbox_init.py) wrapping the command;
    ``egress``: its relay's setting (``SandboxNetwork.relay_setting``); ``layer``: the
    copy-on-write layer's (``layout.layer_setting``), "" to write the working dir directly."""
    deadline = 0.0 if timeout is None else timeout + DEADLINE_GRACE
    return [init_python(), "-I", "-S", "-c", _INIT_SOURCE, marker, f"{STATUS_DIR}/status",
            f"{deadline:.3f}", egress, layer, *argv]


def read_attempts(status_dir: str) -> str:
    """What the init's relay says was tried while the network was off (written inside the
    sandbox: bounded here, parsed by ``egress.sandbox.relay_attempts``)."""
    try:
        with open(os.path.join(status_dir, "egress"), encoding="ascii", errors="replace") as f:
            return f.read(_ATTEMPTS_MAX)
    except OSError:
        return ""


def started_in(status_dir: str) -> bool:
    """Whether the init recorded that it was about to start the command (see sandbox_init)."""
    return os.path.exists(os.path.join(status_dir, "started"))


def read_status(path: str) -> str:
    """The init's report (``exit N`` / ``signal N``), or "" if absent or malformed.

    The file is written from inside the sandbox, so it is read with a size
    bound and only trusted to refine an ambiguous ``128 + N`` into a signal.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            status = handle.read(64).strip()
    except OSError:
        return ""
    return status if re.fullmatch(r"(exit|signal) \d{1,3}", status) else ""
