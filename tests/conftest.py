"""Shared fixtures: the real runsc must be there in CI, and nothing may leak."""

from __future__ import annotations

import os
import tempfile

import psutil
import pytest

from gvisor_magic.backends.runsc import RunscBackend
from gvisor_magic.runner import REGISTRY

IN_CI = os.environ.get("CI") == "true" or os.environ.get("GVISOR_MAGIC_TEST_REQUIRE_RUNSC") == "1"


def sandbox_processes() -> list[psutil.Process]:
    """runsc processes started by this package (their cmdline names our sandbox ids)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if "gvisor-magic-" in cmdline and "runsc" in cmdline:
            found.append(process)
    return found


def scratch_dirs() -> set[str]:
    base = tempfile.gettempdir()
    return {name for name in os.listdir(base) if name.startswith("gvisor-magic-")}


@pytest.fixture(scope="session")
def runsc_works() -> None:
    """Fail in CI (skip locally, saying why) when runsc cannot run a sandbox here."""
    status = RunscBackend().probe()
    if not status.available:
        message = f"runsc is not usable here: {status.reason} (fix: {status.fix})"
        if IN_CI:
            pytest.fail(message + " -- `make test` installs runsc; CI must run these tests")
        pytest.skip(message)


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch: pytest.MonkeyPatch):
    """Every test starts from fresh probes and must leave no sandbox or scratch dir behind."""
    for name in ("GVISOR_MAGIC_MODE", "GVISOR_MAGIC_REQUIRE_ISOLATION", "GVISOR_MAGIC_RUNSC",
                 "GVISOR_MAGIC_RUNSC_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    REGISTRY.forget()
    before = scratch_dirs()
    yield
    REGISTRY.forget()
    left = sandbox_processes()
    assert not left, f"sandbox processes left behind: {[p.info['cmdline'] for p in left]}"
    new_dirs = scratch_dirs() - before
    assert not new_dirs, f"temporary directories left behind: {sorted(new_dirs)}"
