"""Shared fixtures: the real runsc must be there in CI, and nothing may leak."""

from __future__ import annotations

import os
import tempfile

import psutil
import pytest

from gvisor_magic.backends.runsc import RunscBackend
from gvisor_magic.runner import REGISTRY

IN_CI = os.environ.get("CI") == "true" or os.environ.get("GVISOR_MAGIC_TEST_REQUIRE_RUNSC") == "1"


# This session's own temporary directory: every sandbox state dir, bundle and
# scratch dir this test process creates lives in it, so leak checks see only
# our own leftovers even when other suites run on the machine at the same time.
SESSION_TMP = tempfile.mkdtemp(prefix="gvm-tests-")
os.chmod(SESSION_TMP, 0o755)  # the non-root tests read copies made under it
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(SESSION_TMP, ignore_errors=True)


def sandbox_processes() -> list[psutil.Process]:
    """runsc processes serving sandboxes of this test session (found by their state dir)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info.get("cmdline") or [])
        except psutil.Error:
            continue
        if SESSION_TMP in cmdline and "gvisor-magic-" in cmdline:
            found.append(process)
    return found


def our_containers() -> list[str]:
    """Containers this test process created (by the backend's owner-pid label), if any."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        found = client.containers.list(
            all=True, filters={"label": f"io.github.gvisor-magic.owner-pid={os.getpid()}"})
        client.close()
    except Exception:  # no daemon here: nothing of ours can exist in it
        return []
    return [c.short_id for c in found]


def scratch_dirs() -> set[str]:
    return {name for name in os.listdir(SESSION_TMP) if name.startswith("gvisor-magic-")}


@pytest.fixture(scope="session")
def runsc_works() -> None:
    """Fail in CI (skip locally, saying why) when runsc cannot run a sandbox here."""
    status = RunscBackend().probe()
    if not status.available:
        message = f"runsc is not usable here: {status.reason} (fix: {status.fix})"
        if IN_CI:
            pytest.fail(message + " -- `make test` installs runsc; CI must run these tests")
        pytest.skip(message)


@pytest.fixture(scope="session")
def docker_works() -> None:
    """Fail in CI (skip locally, saying why) when Docker cannot run a runsc container here."""
    from gvisor_magic.backends.docker import DockerBackend

    status = DockerBackend().probe()
    if not status.available:
        message = f"Docker+runsc is not usable here: {status.reason} (fix: {status.fix})"
        if IN_CI:
            pytest.fail(message + " -- `make test` starts dockerd and registers runsc")
        pytest.skip(message)


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch: pytest.MonkeyPatch):
    """Every test starts from fresh probes and must leave no sandbox or scratch dir behind."""
    for name in ("GVISOR_MAGIC_MODE", "GVISOR_MAGIC_REQUIRE_ISOLATION", "GVISOR_MAGIC_RUNSC",
                 "GVISOR_MAGIC_RUNSC_FLAGS", "GVISOR_MAGIC_DOCKER_RUNTIME", "GVISOR_MAGIC_IMAGE",
                 "GVISOR_MAGIC_STATE_DIR", "GVISOR_MAGIC_REUSE"):
        monkeypatch.delenv(name, raising=False)
    REGISTRY.forget()
    before = scratch_dirs()
    yield
    REGISTRY.forget()
    left = sandbox_processes()
    assert not left, f"sandbox processes left behind: {[p.info['cmdline'] for p in left]}"
    containers = our_containers()
    assert not containers, f"containers left behind: {containers}"
    new_dirs = scratch_dirs() - before
    assert not new_dirs, f"temporary directories left behind: {sorted(new_dirs)}"
