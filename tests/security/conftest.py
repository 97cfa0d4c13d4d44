"""The hostile-probe harness: every probe on every backend, one-shot (a fresh sandbox per
call), reused (repeated one-shot calls in the warm sandbox the pool keeps for them) and in a
warm session.

A probe runs something an attacker would try and then decides, from evidence
gathered on the host, whether it got through. ``Probe.verdict`` records that
(``blocked`` or ``LEAKED``) in the test's ``user_properties``, which
``scripts/security_report.py`` turns into its table. A leak under gVisor
(runsc, Docker) fails the test. On the subprocess backend leaks are the
expected truth: they are recorded, and the test asserts that every result
said ``isolated=False``. Probes that would hurt the host (bombs, mounts,
killing processes) never run on the subprocess backend; they are recorded as
``n/a`` with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gvisor_magic import CommandResult, IsolatedSession, Limits, run_command_isolated
from gvisor_magic.warm import POOL

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
                                               limits=self.limits, max_output=self.max_output)
            result = self.session.run(command, timeout=timeout, **kwargs)
        else:
            reused = self.flavour == "reused"
            if reused:
                # The first call of a spec runs fresh; from the second, the pool's sandbox
                # (a cheap call when it is already warm).
                same = {k: v for k, v in kwargs.items()
                        if k in ("protected_paths", "network", "repo_path", "shell")}
                run_command_isolated("true", working_dir=self.workdir, mode=self.backend,
                                     limits=self.limits, **same)
            result = run_command_isolated(command, working_dir=self.workdir, mode=self.backend,
                                          timeout=timeout, limits=self.limits,
                                          max_output=self.max_output, reuse=reused, **kwargs)
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


def pytest_configure(config):
    config.addinivalue_line("markers", "limits(**kw): the Limits a security probe runs with")


@pytest.fixture(params=CASES, ids=[f"{b}-{f}" for b, f in CASES])
def probe(request, tmp_path) -> Iterator[Probe]:
    """A probe bound to one backend and flavour; checks the host afterwards."""
    backend, flavour = request.param
    if backend != "subprocess":
        request.getfixturevalue(f"{backend}_works")
    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = request.node.get_closest_marker("limits")
    limits = Limits(**marker.kwargs) if marker is not None else None
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    instance = Probe(request.node, backend, flavour, workdir, limits)
    try:
        yield instance
    finally:
        if instance.session is not None:
            instance.session.close()
        POOL.reset()  # the reused flavour's sandbox: it must go when the pool lets it go
        strays = tagged_processes(instance.tag)
        for process in strays:
            with contextlib.suppress(psutil.Error):
                process.kill()
    instance.finish()
    # The host is unchanged: no process of the probe survives, no new child of
    # ours is left, and the sandbox (one-shot, session or container) is gone.
    assert not strays, f"processes of the probe survived: {[p.pid for p in strays]}"
    new_children = [p for p in me.children(recursive=True) if p.pid not in children
                    and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                    and not any(CANARY_ARG in part for part in p.cmdline())]
    assert not new_children, f"children left: {[p.cmdline() for p in new_children]}"
    left = sandbox_left(instance.sandbox_ids)
    assert not left, f"the sandbox is not gone: {left}"
    if not instance.isolated:
        assert all(not r.isolated for r in instance.results)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A host directory next to the working dir, not mounted: holds a canary secret."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_text("CANARY-OUTSIDE-SECRET\n")
    return directory


@pytest.fixture
def host_canary_process() -> Iterator[tuple[psutil.Process, str]]:
    """A host process holding a secret in its environment and command line (a Jupyter
    server with its token, say); it must still be there, untouched, afterwards."""
    secret = f"CANARY-TOKEN-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [PYTHON, "-c", "import sys, time; time.sleep(600)", f"{CANARY_ARG}{secret}"],
        env={"PATH": os.environ.get("PATH", ""), "JUPYTERHUB_API_TOKEN": secret,
             "AWS_SECRET_ACCESS_KEY": secret}, stdin=subprocess.DEVNULL)
    try:
        yield psutil.Process(proc.pid), secret
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def service_account_token() -> Iterator[str]:
    """A Kubernetes service-account token on the host, as a pod has one."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    created: list[Path] = []
    secret = f"CANARY-K8S-{uuid.uuid4().hex}"
    for parent in reversed(path.parents):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as exc:
                pytest.skip(f"cannot create {parent} on the host ({exc}): not root")
            created.append(parent)
    if path.exists():
        secret = path.read_text()  # someone's real (or another run's) token: still a secret
    else:
        path.write_text(secret)
        created.append(path)
    try:
        yield secret
    finally:
        for item in reversed(created):
            with contextlib.suppress(OSError):
                item.unlink() if item.is_file() else item.rmdir()


@pytest.fixture
def host_scratch() -> Iterator[Path]:
    """A directory on the host outside every sandbox mount (not under TMPDIR)."""
    directory = Path(tempfile.mkdtemp(prefix="gvm-probe-", dir="/var/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
