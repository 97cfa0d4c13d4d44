"""A warm sandbox whose runsc fails at start says runsc's own reason, every time.

runsc writes its reason to stderr and exits, which also closes the agent's channel: the
error built on that close must wait for the stderr reader, which may not have read the
line yet (it said only "the sandbox agent closed its channel (no message)" about one
start in two here)."""

from __future__ import annotations

import logging
import shutil

import pytest

from gvisor_magic import IsolatedSession, IsolationUnavailable, run_command_isolated, runner
from gvisor_magic.runner import REGISTRY
from gvisor_magic.warm import POOL

TIMES = 20
SAID = "runsc: gvm-start-error-4711 this runsc refuses to start"
FAILS = f"#!/bin/sh\necho '{SAID}' >&2\nexit 1\n"
#: A bad value of a real flag: runsc itself says why, as its last line, and exits.
PLATFORM = "bogus-4711"
REAL_SAYS = f"unknown platform: {PLATFORM}"


def _script(tmp_path, text: str) -> str:
    path = tmp_path / "runsc-wrapper"
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture(params=["script", "real runsc, bad flag"])
def failing_runsc(request, tmp_path, monkeypatch) -> str:
    """GVISOR_MAGIC_RUNSC set to a runsc that fails at start; returns what it says."""
    if request.param == "script":
        runsc, said = _script(tmp_path, FAILS), SAID
    else:
        request.getfixturevalue("runsc_works")
        real = shutil.which("runsc")
        runsc = _script(tmp_path, f'#!/bin/sh\nexec {real} --platform={PLATFORM} "$@"\n')
        said = REAL_SAYS
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", runsc)
    REGISTRY.forget()
    return said


def test_an_isolated_session_start_names_runscs_reason(failing_runsc, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for attempt in range(TIMES):
        session = IsolatedSession(work, mode="runsc")
        try:
            with pytest.raises(IsolationUnavailable) as caught:
                session.start()
        finally:
            session.close()
        assert failing_runsc in str(caught.value), f"attempt {attempt}: {caught.value}"


def test_a_reused_one_shot_start_names_runscs_reason(failing_runsc, tmp_path, caplog,
                                                     monkeypatch):
    """run_command_isolated(reuse=True): the call's error, and the warm sandbox the pool
    tried for the repeated call (it then runs the call in a fresh one), both say it."""
    work = tmp_path / "work"
    work.mkdir()
    # Not cached: each call tries runsc again, a warm sandbox first (the call repeats).
    monkeypatch.setattr(runner, "NEGATIVE_PROBE_TTL", 0.0)
    caplog.set_level(logging.INFO, logger="gvisor_magic")
    try:
        for attempt in range(TIMES):
            with pytest.raises(IsolationUnavailable) as caught:
                run_command_isolated("true", working_dir=work, mode="runsc", reuse=True)
            assert failing_runsc in str(caught.value), f"attempt {attempt}: {caught.value}"
    finally:
        POOL.reset()
    warm = [record.getMessage() for record in caplog.records
            if "no warm sandbox to reuse" in record.getMessage()]
    assert len(warm) == TIMES - 1, warm  # every call but the first tried a warm sandbox
    assert all(failing_runsc in message for message in warm), warm
