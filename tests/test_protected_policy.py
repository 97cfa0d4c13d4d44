"""The protected-paths policy as pure functions: what gets protected, hidden or scrubbed.

Fast and sandbox-free (tmp_path only): they pin down the decisions the runsc and
Docker backends render as mounts, so that a user can predict them. Imports are
done inside each test, so a missing name fails that test, not the collection.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def protections_by_path(plan) -> dict[str, object]:
    return {os.fspath(p.path): p for p in plan.protections}


def plan_for(home: Path, policy=None):
    from gvisor_magic.protected import PathPolicy, plan_protection

    return plan_protection(writable=[str(home)], readable=[],
                           policy=policy if policy is not None else PathPolicy(),
                           homes=[str(home)])


def make_repo(root: Path) -> None:
    """A git repository's control files, laid out as ``git init`` makes them."""
    git = root / ".git"
    for sub in ("hooks", "info", "objects", "refs/heads", "refs/tags"):
        (git / sub).mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "config").write_text("[core]\n\trepositoryformatversion = 0\n\tbare = false\n")
    (git / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")


@pytest.fixture
def home(tmp_path) -> Path:
    """A user's home as the working dir: rc files, a project repo, secrets at depth."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# bashrc\n")
    (home / ".profile").write_text("# profile\n")
    make_repo(home / "proj")
    (home / "a" / "b" / ".ssh").mkdir(parents=True)
    (home / "a" / "b" / ".ssh" / "id_ed25519").write_text("KEY\n")
    (home / "sub").mkdir()
    (home / "sub" / ".env").write_text("TOKEN=x\n")
    (home / "sub" / ".env.local").write_text("TOKEN=y\n")
    (home / "sub" / ".env.example").write_text("TOKEN=\n")
    runtime = home / ".local" / "share" / "jupyter" / "runtime"
    runtime.mkdir(parents=True)
    (runtime / "kernel-abc.json").write_text('{"key": "x"}\n')
    (home / "data" / "raw").mkdir(parents=True)
    return home


# -- PathPolicy -------------------------------------------------------------------------------


def test_policy_entries_relax_by_name_or_add_paths():
    """"-NAME" relaxes a built-in entry; anything else is an extra read-only path."""
    from gvisor_magic.protected import PathPolicy

    policy = PathPolicy.parse(["-.bashrc", "data/raw", "/abs/x"])
    assert policy.relaxed == (".bashrc",)
    assert policy.extra == ("data/raw", "/abs/x")
    empty = PathPolicy()
    assert tuple(empty.relaxed) == () and tuple(empty.extra) == ()


def test_policy_from_the_environment(monkeypatch):
    """GVISOR_MAGIC_PROTECTED_PATHS holds ":"-separated entries; unset means the defaults."""
    from gvisor_magic.protected import PathPolicy

    monkeypatch.setenv("GVISOR_MAGIC_PROTECTED_PATHS", "-.vscode:data/raw:/srv/shared")
    policy = PathPolicy.from_env()
    assert policy.relaxed == (".vscode",)
    assert policy.extra == ("data/raw", "/srv/shared")
    monkeypatch.delenv("GVISOR_MAGIC_PROTECTED_PATHS")
    unset = PathPolicy.from_env()
    assert tuple(unset.relaxed) == () and tuple(unset.extra) == ()


@pytest.mark.parametrize("entry", ["", "-", "data/\0raw", "-.bash\0rc"],
                         ids=["empty", "bare-dash", "nul", "nul-relax"])
def test_bad_policy_entries_are_refused(entry):
    """An empty entry, a lone "-" or a NUL byte is a mistake, refused before anything runs."""
    from gvisor_magic.errors import InvalidRequestError
    from gvisor_magic.protected import PathPolicy

    with pytest.raises(InvalidRequestError):
        PathPolicy.parse([entry])


# -- plan_protection --------------------------------------------------------------------------


def test_plan_shapes(home):
    """Every planned protection says what, how, whether it exists, its kind and why."""
    from gvisor_magic.protected import Protection

    plan = plan_for(home)
    assert isinstance(plan.complete, bool)
    assert plan.protections, "a home with rc files and a repo must be protected"
    for protection in plan.protections:
        assert isinstance(protection, Protection)
        assert protection.action in {"read-only", "hidden"}, protection
        assert protection.kind in {"file", "dir"}, protection
        assert isinstance(protection.exists, bool), protection
        assert isinstance(protection.why, str) and protection.why.strip(), protection
        assert os.path.isabs(os.fspath(protection.path)), protection


def test_home_config_that_runs_is_read_only(home):
    """An existing ~/.bashrc is mounted read-only; a missing ~/.ipython gets a stand-in."""
    plan = protections_by_path(plan_for(home))
    bashrc = plan[str(home / ".bashrc")]
    assert (bashrc.action, bashrc.kind, bashrc.exists) == ("read-only", "file", True)
    ipython = plan[str(home / ".ipython")]
    assert (ipython.action, ipython.kind, ipython.exists) == ("read-only", "dir", False)


def test_git_control_files_are_read_only(home):
    """A repo's .git/config and .git/hooks cannot be rewritten from inside."""
    plan = protections_by_path(plan_for(home))
    assert plan[str(home / "proj" / ".git" / "config")].action == "read-only"
    assert plan[str(home / "proj" / ".git" / "hooks")].action == "read-only"
    assert plan[str(home / "proj" / ".git" / "hooks")].kind == "dir"


def test_secrets_at_depth_are_hidden(home):
    """A nested .ssh, .env and .env.* and Jupyter's runtime dir are hidden; .env.example is
    not a secret."""
    plan = protections_by_path(plan_for(home))
    assert plan[str(home / "a" / "b" / ".ssh")].action == "hidden"
    assert plan[str(home / "sub" / ".env")].action == "hidden"
    assert plan[str(home / "sub" / ".env.local")].action == "hidden"
    runtime = home / ".local" / "share" / "jupyter" / "runtime"
    assert plan[str(runtime)].action == "hidden"
    example = str(home / "sub" / ".env.example")
    assert example not in plan or plan[example].action != "hidden"


def test_a_symlinked_ssh_inside_the_mount_hides_its_target(tmp_path):
    """~/.ssh -> dotfiles/ssh (stow): what is hidden is the real folder."""
    home = tmp_path / "home"
    (home / "dotfiles" / "ssh").mkdir(parents=True)
    (home / "dotfiles" / "ssh" / "id_ed25519").write_text("KEY\n")
    (home / ".ssh").symlink_to("dotfiles/ssh")
    plan = protections_by_path(plan_for(home))
    target = os.path.realpath(home / "dotfiles" / "ssh")
    assert target in plan, sorted(plan)
    assert plan[target].action == "hidden"
    assert plan[target].kind == "dir"


def test_a_symlinked_ssh_pointing_outside_the_mount_is_not_planned(tmp_path):
    """A link whose target is not mounted needs nothing: nothing to hide, nothing to mount."""
    home, outside = tmp_path / "home", tmp_path / "outside-ssh"
    home.mkdir()
    outside.mkdir()
    (outside / "id_ed25519").write_text("KEY\n")
    (home / ".ssh").symlink_to(outside)
    plan = protections_by_path(plan_for(home))
    assert str(home / ".ssh") not in plan, plan.get(str(home / ".ssh"))
    assert os.path.realpath(outside) not in plan
    assert not any(path.startswith(str(outside)) for path in plan), sorted(plan)


def test_relaxing_and_extending(home):
    """"-.bashrc" drops ~/.bashrc from the plan; "data/raw" adds that folder read-only."""
    from gvisor_magic.protected import PathPolicy

    relaxed = protections_by_path(plan_for(home, PathPolicy.parse(["-.bashrc"])))
    assert str(home / ".bashrc") not in relaxed
    assert str(home / ".profile") in relaxed, "only the named entry is relaxed"
    extended = protections_by_path(plan_for(home, PathPolicy.parse(["data/raw"])))
    raw = extended[str(home / "data" / "raw")]
    assert (raw.action, raw.kind, raw.exists) == ("read-only", "dir", True)


# -- scrub_config_text ------------------------------------------------------------------------


def test_scrubbing_a_git_config():
    """Credentials in URLs and auth headers are removed; the URL itself stays usable."""
    from gvisor_magic.protected import scrub_config_text

    text = ('[remote "o"]\n\turl = https://u:tok@host/x.git\n'
            "[http]\n\textraheader = AUTHORIZATION: bearer tok\n")
    scrubbed = scrub_config_text(text)
    assert "tok" not in scrubbed
    assert "https://host/x.git" in scrubbed
    assert '[remote "o"]' in scrubbed


def test_scrubbing_pip_and_npm_config():
    """pip.conf keeps its index without the password; .npmrc loses its auth token; harmless
    lines stay."""
    from gvisor_magic.protected import scrub_config_text

    pip = scrub_config_text("[global]\nindex-url = https://u:p@mirror/simple\ntimeout = 60\n")
    assert "https://mirror/simple" in pip
    assert "u:p@" not in pip
    assert "timeout = 60" in pip
    npm = scrub_config_text("registry=https://registry.example/\n//registry/:_authToken=abc\n")
    assert "abc" not in npm and "_authToken" not in npm
    assert "registry=https://registry.example/" in npm
    harmless = "[core]\n\teditor = vim\n"
    assert "\teditor = vim" in scrub_config_text(harmless)


# -- the environment allowlist ----------------------------------------------------------------


def test_only_real_locale_variables_pass(monkeypatch):
    """LC_ALL and friends reach the sandbox; a host variable merely named LC_* does not."""
    from gvisor_magic.request import sandbox_env

    monkeypatch.setenv("LC_AUDIT_TOKEN", "CANARY-lc-token")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("LC_TIME", "en_GB.UTF-8")
    monkeypatch.setenv("TZ", "Europe/Paris")
    env = sandbox_env({}, home="/tmp/home", path="/usr/bin:/bin", user="u")
    assert "LC_AUDIT_TOKEN" not in env
    assert "CANARY-lc-token" not in env.values()
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["LC_TIME"] == "en_GB.UTF-8"
    assert env["TZ"] == "Europe/Paris"
