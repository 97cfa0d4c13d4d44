"""``spec=`` is how a call names its sandbox; the older keywords are a thin shim onto it.

``resolve_spec`` is that shim: these check what it makes of each spelling, and that the two
spellings are never mixed (the real runs are in tests/test_spec_api.py).
"""

from __future__ import annotations

import os

import pytest

from gvisor_magic import IsolatedSession, Limits, SandboxSpec
from gvisor_magic.request import SANDBOX_KEYWORDS, resolve_spec


def test_a_spec_is_taken_as_it_is_without_its_plan(tmp_path):
    spec = SandboxSpec.from_options({"working_dir": tmp_path, "network": "pypi",
                                     "limits": ["memory=1G"]})
    assert resolve_spec(spec, {}) == spec
    assert resolve_spec(spec, dict.fromkeys(SANDBOX_KEYWORDS)) == spec


def test_the_keywords_make_the_spec_from_options_would(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    given = {"working_dir": tmp_path, "repo_path": repo, "network": ["example.org"],
             "limits": Limits(memory=2**30), "shell": "/bin/bash",
             "protected_paths": ["-.bashrc", "notes.txt"]}
    assert resolve_spec(None, given) == SandboxSpec.from_options(given)


def test_a_path_where_the_spec_goes_is_the_older_positional_working_dir(tmp_path):
    assert resolve_spec(tmp_path, {}).working_dir == os.path.realpath(tmp_path)
    assert resolve_spec(str(tmp_path), {"network": True}).network.mode == "public"
    with pytest.raises(TypeError, match="working_dir was given twice"):
        resolve_spec(tmp_path, {"working_dir": tmp_path})


def test_spec_and_keywords_together_are_refused_with_the_way_to_change_a_spec(tmp_path):
    spec = SandboxSpec.from_options({"working_dir": tmp_path})
    with pytest.raises(TypeError, match=r"not both \(got spec= and network=\).*base=spec"):
        resolve_spec(spec, {"network": "pypi"})


def test_bad_input_is_refused_at_the_edge(tmp_path):
    with pytest.raises(TypeError, match=r"spec must be a gvisor_magic\.SandboxSpec, got dict"):
        resolve_spec({"working_dir": tmp_path}, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown sandbox keyword"):
        resolve_spec(None, {"workdir": tmp_path})
    with pytest.raises(TypeError, match=r"limits must be a gvisor_magic\.Limits"):
        resolve_spec(None, {"limits": {"memory": "1G"}})


def test_a_session_without_a_working_dir_takes_the_current_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = os.path.realpath(tmp_path)
    assert resolve_spec(None, {}, default_working_dir=os.getcwd()).working_dir == here
    assert resolve_spec(SandboxSpec(), {}, default_working_dir=os.getcwd()).working_dir == here
    # Made, never started: a session's sandbox starts at its first run.
    pypi = SandboxSpec.from_options({"network": "pypi"})
    for session in (IsolatedSession(), IsolatedSession(pypi),
                    IsolatedSession(tmp_path, network="pypi"), IsolatedSession.for_spec(pypi)):
        assert session.spec.working_dir == here and session.state == "stopped"
        session.close()
    with pytest.raises(TypeError, match="not both"):
        IsolatedSession(SandboxSpec(), network="pypi")
