"""A sandbox named by ``spec=`` and the same sandbox named by the older keywords run alike,
on gVisor: the same mounts, network and limits, and the host sees the same effects."""

from __future__ import annotations

import os

import pytest

from gvisor_magic import IsolatedSession, Limits, SandboxSpec, run_command_isolated

SCRIPT = ("pwd; ls {repo}; ulimit -n; echo made > made.txt; "
          "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), 2)' "
          "2>/dev/null && echo online || echo offline")


@pytest.fixture
def place(tmp_path):
    work, repo = tmp_path / "work", tmp_path / "repo"
    work.mkdir()
    repo.mkdir()
    (repo / "in-repo").write_text("x")
    return work, repo


def _spec(work, repo) -> SandboxSpec:
    return SandboxSpec.from_options({"working_dir": work, "repo_path": repo,
                                     "limits": ["max_open_files=321"]})


def _lines(result) -> list[str]:
    assert result.isolated and result.returncode == 0, result.describe()
    return result.stdout.split()


def test_run_command_isolated_takes_a_spec_or_the_keywords_alike(runsc_works, place):
    work, repo = place
    script = SCRIPT.format(repo=repo)
    by_spec = run_command_isolated(script, _spec(work, repo), mode="runsc", reuse=False)
    assert (work / "made.txt").read_text() == "made\n"
    (work / "made.txt").unlink()
    by_keywords = run_command_isolated(script, working_dir=work, repo_path=repo,
                                       limits=Limits(max_open_files=321), mode="runsc",
                                       reuse=False)
    assert _lines(by_spec) == _lines(by_keywords) == [
        os.path.realpath(work), "in-repo", "321", "offline"]
    assert (work / "made.txt").read_text() == "made\n"


def test_a_session_takes_a_spec(runsc_works, place):
    work, repo = place
    with IsolatedSession(_spec(work, repo), mode="runsc") as session:
        assert session.state == "warm"
        assert _lines(session.run(SCRIPT.format(repo=repo))) == [
            os.path.realpath(work), "in-repo", "321", "offline"]
    assert (work / "made.txt").read_text() == "made\n"


def test_spec_and_keywords_together_run_nothing(place):
    work, repo = place
    with pytest.raises(TypeError, match="not both"):
        run_command_isolated("touch ran", _spec(work, repo), network="pypi")
    assert not (work / "ran").exists()


@pytest.mark.parametrize("mode", ["runsc", "docker"])
def test_a_setting_given_by_name_holds_inside(mode, request, tmp_path):
    """``hostname``, the setting docs/architecture.md adds as its example, on both backends
    and both paths (one-shot and a session)."""
    request.getfixturevalue(f"{mode}_works")
    spec = SandboxSpec.from_options({"working_dir": tmp_path, "hostname": "build-box"})
    script = "hostname; cat /etc/hostname; echo $HOSTNAME"
    one_shot = run_command_isolated(script, spec, mode=mode, reuse=False)
    with IsolatedSession(spec, mode=mode) as session:
        warm = session.run(script)
    for result in (one_shot, warm):
        assert _lines(result) == ["build-box"] * 3
