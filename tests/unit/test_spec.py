"""A sandbox's spec apart from a command's request: hashable, validated at the edge, and
what a kernel compares to decide whether a cell can reuse its warm sandbox."""

from __future__ import annotations

import pytest

from gvisor_magic import InvalidRequestError, Limits, SandboxSpec
from gvisor_magic.notebook.kernel_session import _differences
from gvisor_magic.request import CommandRequest


def test_equal_specs_are_one_sandbox_and_any_setting_makes_another(tmp_path):
    one = SandboxSpec.build(tmp_path, protected_paths=["-.bashrc"])
    assert one == SandboxSpec.build(str(tmp_path), protected_paths=["-.bashrc"])
    assert len({one, SandboxSpec.build(tmp_path, protected_paths=["-.bashrc"])}) == 1
    others = [SandboxSpec.build(tmp_path, network=True),
              SandboxSpec.build(tmp_path, limits=Limits(memory=1 << 30)),
              SandboxSpec.build(tmp_path, shell="/bin/bash"),
              SandboxSpec.build(tmp_path, repo_path=tmp_path)]
    assert len({one, *others}) == 5


def test_a_spec_is_checked_where_it_is_made(tmp_path):
    with pytest.raises(InvalidRequestError, match="working_dir"):
        SandboxSpec.build(tmp_path / "missing")
    with pytest.raises(InvalidRequestError, match="network"):
        SandboxSpec.build(tmp_path, network=42)
    with pytest.raises(InvalidRequestError, match="not a URL"):
        SandboxSpec.build(tmp_path, network="https://pypi.org/simple")
    with pytest.raises(TypeError, match="limits"):
        SandboxSpec.build(tmp_path, limits={"memory": 1})


def test_a_request_runs_in_its_spec_or_in_its_own_cwd(tmp_path):
    (tmp_path / "sub").mkdir()
    spec = SandboxSpec.build(tmp_path, shell="/bin/bash")
    here = CommandRequest.build("ls", spec=spec)
    there = CommandRequest.build("ls", spec=spec, cwd=tmp_path / "sub")
    assert here.working_dir == str(tmp_path) and there.working_dir == str(tmp_path / "sub")
    assert here.argv == ("/bin/bash", "-c", "ls")  # the spec's shell
    assert there.spec is spec and not there.network.enabled
    with pytest.raises(InvalidRequestError, match="cwd"):
        CommandRequest.build("ls", spec=spec, cwd=tmp_path / "missing")


def test_a_cell_is_told_what_made_its_sandbox_another(tmp_path):
    old = (SandboxSpec.build(tmp_path), None, None)
    new = (SandboxSpec.build(tmp_path, network=True, limits=Limits(memory=1 << 30)), "docker",
           None)
    assert _differences(old, new) == ["other network", "other limits", "other mode"]
    assert _differences(None, new) == [] and _differences(old, old) == []
    # Every field of the spec counts, a setting added later too.
    named = (SandboxSpec.from_options({"working_dir": tmp_path, "hostname": "other"}), None, None)
    assert _differences(old, named) == ["other hostname"]
