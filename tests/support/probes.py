"""The hostile-probe harness of tests/security: a ``Probe`` runs what an attacker would try on
one backend and flavour and records its verdicts (the fixtures that make one are in
tests/security/conftest.py, which says how the verdicts become the security report).
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from gvisor_magic import CommandResult, IsolatedSession, Limits, run_command_isolated

GVISOR_RELEASE = "4.4.0"
BACKENDS = ("runsc", "docker", "subprocess")
FLAVOURS = ("one-shot", "reused", "session")
#: Where each flavour exists: only gVisor backends keep warm sandboxes for one-shot calls.
CASES = [(b, f) for b in BACKENDS for f in FLAVOURS
         if not (b == "subprocess" and f == "reused")]
PYTHON = sys.executable
CANARY_ARG = "--canary-token="
#: Before a bomb: proves that this very sandbox runs on gVisor's kernel, or stops.
PYTHON_GUARD = (f"import os, sys\nif os.uname().release != {GVISOR_RELEASE!r}:\n"
                "    print('NOT-GVISOR'); sys.exit(99)\n")
GVISOR_GUARD = f'[ "$(uname -r)" = {GVISOR_RELEASE} ] || {{ echo NOT-GVISOR; exit 99; }}; '


class Probe:
    """One probe's runs on one backend and flavour, and its verdicts."""

    def __init__(self, node: pytest.Item, backend: str, flavour: str, workdir: Path,
                 limits: Limits | None = None, max_output: int = 4 * 2**20) -> None:
        self.node, self.backend, self.flavour = node, backend, flavour
        self.workdir = workdir
        #: The probes attack the sandbox where its writes reach the host as they are made
        #: (``writes="direct"``), the setting that gives them the most; held writes, the
        #: default, are attacked by tests/security/test_held_writes.py.
        self.writes = "direct"
        self.limits = limits
        self.max_output = max_output
        self.results: list[CommandResult] = []
        self.leaks: list[str] = []
        self.session: IsolatedSession | None = None
        self.sandbox_ids: list[str] = []
        #: A unique word for files and processes this probe creates on the host.
        self.tag = f"gvm-probe-{uuid.uuid4().hex[:10]}"

    @property
    def isolated(self) -> bool:
        return self.backend != "subprocess"

    def harmless_only(self, names: list[str], why: str) -> None:
        """Called by probes that must not run unisolated: n/a on subprocess."""
        if not self.isolated:
            for name in names:
                self.na(name, why)
            pytest.skip(f"n/a on subprocess: {why}")

    def run(self, command: str | list[str], *, timeout: float = 60, **kwargs) -> CommandResult:
        if self.flavour == "session":
            if self.session is None:
                self.session = IsolatedSession(self.workdir, mode=self.backend,
                                               limits=self.limits, max_output=self.max_output,
                                               writes=self.writes)
            result = self.session.run(command, timeout=timeout, **kwargs)
        else:
            reused = self.flavour == "reused"
            if reused:
                # The first call of a spec runs fresh; from the second, the pool's sandbox
                # (a cheap call when it is already warm).
                same = {k: v for k, v in kwargs.items()
                        if k in ("protected_paths", "network", "repo_path", "shell")}
                run_command_isolated("true", working_dir=self.workdir, mode=self.backend,
                                     limits=self.limits, writes=self.writes, **same)
            result = run_command_isolated(command, working_dir=self.workdir, mode=self.backend,
                                          timeout=timeout, limits=self.limits,
                                          max_output=self.max_output, reuse=reused,
                                          writes=self.writes, **kwargs)
            if reused:
                assert {"reused", "not_reused", "not_started"} & set(result.details), (
                    "a reused call ran in a fresh sandbox without saying why: "
                    + result.describe())
        self.results.append(result)
        for key in ("sandbox_id", "container_id", "session"):
            if key in result.details:
                self.sandbox_ids.append(result.details[key])
        assert result.backend == self.backend, result.describe()
        assert result.isolated is self.isolated, "a result must say where it really ran"
        return result

    def run_python(self, code: str, *args: str, gvisor_only: bool = False,
                   **kwargs) -> tuple[CommandResult, dict]:
        """Run a Python probe script; it prints one JSON object on its last line.

        ``gvisor_only``: the script first proves it runs on gVisor's kernel, or stops.
        """
        if gvisor_only:
            assert self.isolated, "a bomb is never aimed at the host"
            code = PYTHON_GUARD + code
        result = self.run([PYTHON, "-c", code, *args], **kwargs)
        assert "NOT-GVISOR" not in result.stdout, "refused: this sandbox is not gVisor"
        lines = result.stdout.strip().splitlines()
        try:
            found = json.loads(lines[-1])
        except (IndexError, ValueError):
            pytest.fail(f"the probe script failed: {result.describe()}\n{result.stderr[-2000:]}")
        return result, found

    def run_in_gvisor(self, script: str, **kwargs) -> CommandResult:
        """Run a resource bomb, but only after this same sandbox proved it is gVisor."""
        assert self.isolated, "a bomb is never aimed at the host"
        result = self.run(GVISOR_GUARD + script, **kwargs)
        assert "NOT-GVISOR" not in result.stdout, "refused: this sandbox is not gVisor"
        return result

    def na(self, name: str, why: str) -> None:
        """Record a probe that is not attempted here, and why."""
        self.node.user_properties.append(("security", {
            "probe": name, "backend": self.backend, "flavour": self.flavour,
            "outcome": "n/a", "evidence": why}))

    def verdict(self, name: str, leaked: bool, evidence: str = "") -> None:
        """Record one probe's outcome; a leak on gVisor fails the test at the end."""
        outcome = "LEAKED" if leaked else "blocked"
        self.node.user_properties.append(("security", {
            "probe": name, "backend": self.backend, "flavour": self.flavour,
            "outcome": outcome, "evidence": evidence[:300]}))
        if leaked:
            self.leaks.append(f"{name}: {evidence[:300]}")

    def finish(self) -> None:
        if self.session is not None:
            self.session.close()
            assert self.session.state == "closed"
        if self.leaks and self.isolated:
            pytest.fail(f"LEAKED on {self.backend} ({self.flavour}):\n" + "\n".join(self.leaks))


def tagged_processes(tag: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if any(tag in part for part in process.info["cmdline"] or []):
                found.append(process)
    return found


def sandbox_left(ids: list[str]) -> list[str]:
    """Host processes still serving one of these sandboxes or containers."""
    left = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if any(i and i in cmdline for i in ids):
            left.append(cmdline[:200])
    return left
