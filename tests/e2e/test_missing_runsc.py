"""A hub that points ``GVISOR_MAGIC_RUNSC`` at a path with nothing there.

Found by the hub test: the warm session's start let ``FileNotFoundError``
escape, so a cell raised that instead of ``IsolationUnavailable`` (fail-closed)
or falling back with a reason (auto).
"""

from __future__ import annotations

import pytest

from gvisor_magic import IsolatedSession, IsolationUnavailable

MISSING = "/nonexistent/gvisor-magic-test/runsc"


def test_session_without_runsc_binary_fails_closed(monkeypatch, tmp_path):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", MISSING)
    monkeypatch.setenv("GVISOR_MAGIC_MODE", "runsc")
    with pytest.raises(IsolationUnavailable) as raised, IsolatedSession(str(tmp_path)) as s:
        s.run(["touch", "ran"])
    assert MISSING in str(raised.value)
    assert not (tmp_path / "ran").exists()


def test_session_without_runsc_binary_says_why_in_auto_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", MISSING)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")  # no Docker either
    with IsolatedSession(str(tmp_path), mode="auto") as session:
        session.start()
        assert session.state == "one-shot"
        assert f"cannot execute {MISSING}" in session.cold_reason
