"""Shared fixtures: the real runsc must be there in CI, and nothing may leak.

Helpers that are not fixtures live in tests/support/ (``from support.leaks import ...``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
from support.leaks import our_containers, sandbox_processes, scratch_dirs

from gvisor_magic.backends.runsc import RunscBackend
from gvisor_magic.runner import REGISTRY

IN_CI = os.environ.get("CI") == "true" or os.environ.get("GVISOR_MAGIC_TEST_REQUIRE_RUNSC") == "1"
#: Tests here need no runsc, Docker or daemon (`make test-unit`): their leak check is cheap.
UNIT_TESTS = Path(__file__).resolve().parent / "unit"


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
def no_leaks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Every test starts from fresh probes and must leave no sandbox or scratch dir behind.

    Under tests/unit nothing can start a sandbox or a container, so only the scratch dirs
    are checked there: no process scan, and Docker is never contacted (nor need it run).
    """
    for name in ("GVISOR_MAGIC_MODE", "GVISOR_MAGIC_REQUIRE_ISOLATION", "GVISOR_MAGIC_RUNSC",
                 "GVISOR_MAGIC_RUNSC_FLAGS", "GVISOR_MAGIC_DOCKER_RUNTIME", "GVISOR_MAGIC_IMAGE",
                 "GVISOR_MAGIC_STATE_DIR", "GVISOR_MAGIC_REUSE"):
        monkeypatch.delenv(name, raising=False)
    unit = UNIT_TESTS in request.path.parents
    REGISTRY.forget()
    before = scratch_dirs(SESSION_TMP)
    yield
    REGISTRY.forget()
    pool = sys.modules.get("gvisor_magic.kernel.pool")
    if pool is not None:
        pool.POOL.reset()  # kernels started ahead of need end with their server: this one
    if not unit:
        left = sandbox_processes(SESSION_TMP)
        assert not left, f"sandbox processes left behind: {[p.info['cmdline'] for p in left]}"
        containers = our_containers()
        assert not containers, f"containers left behind: {containers}"
    new_dirs = scratch_dirs(SESSION_TMP) - before
    assert not new_dirs, f"temporary directories left behind: {sorted(new_dirs)}"


# -- the IPython extension in IPython's in-process shell (tests/test_magics_*.py) ------------


@pytest.fixture(scope="module")
def shell():
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython
    from support.ipython_shell import history_in_memory

    shell = start_ipython() or get_ipython()  # None when someone else started it first
    # globalipapp binds a doctest-friendly `system` on the instance: take it away here so
    # `!cmd` behaves as in a real shell (and routing can be checked exactly), then put it back.
    previous = {name: shell.__dict__.pop(name) for name in ("system", "getoutput")
                if name in shell.__dict__}
    history_in_memory(shell)
    yield shell
    shell.__dict__.update(previous)


@pytest.fixture
def ip(shell, monkeypatch, tmp_path, capfd):
    """The shell with the extension loaded in a scratch cwd; everything undone afterwards."""
    from IPython.core.displaypub import CapturingDisplayPublisher

    monkeypatch.chdir(tmp_path)  # %%isolated mounts the cwd read-write
    saved_ns = dict(shell.user_ns)
    shell.config.pop("Isolation", None)
    shell.run_line_magic("load_ext", "gvisor_magic")
    capfd.readouterr()
    # Rich displays (the status badge) are recorded apart from the streams, as a
    # notebook keeps a display_data output apart from stdout and stderr.
    terminal_publisher, shell.display_pub = shell.display_pub, CapturingDisplayPublisher()
    yield shell
    shell.display_pub = terminal_publisher
    shell.run_line_magic("unload_ext", "gvisor_magic")
    shell.config.pop("Isolation", None)
    for name in set(shell.user_ns) - set(saved_ns):
        del shell.user_ns[name]
    shell.user_ns.update(saved_ns)
    assert "system" not in shell.__dict__ and "getoutput" not in shell.__dict__
