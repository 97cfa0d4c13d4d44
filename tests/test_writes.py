"""Held writes, judged from the host: what reaches the working dir, when, and what never does.

Every test runs real sandboxes (runsc and Docker with runsc), one-shot, reused from the
warm pool, and in a session; each looks at the host's files after the command, not at
what the code meant to do. The classes of active changes and the host tools that would
run them are tests/security/test_held_writes.py's; the everyday workflows that must land
with nothing held are tests/test_writes_workflows.py's.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from gvisor_magic import IsolatedSession, IsolationUnavailable, SandboxSpec, run_command_isolated

BACKENDS = ["runsc", "docker"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    request.getfixturevalue(f"{request.param}_works")
    return request.param


def spec_for(path: Path, writes: str, **options) -> SandboxSpec:
    return SandboxSpec.from_options({"working_dir": str(path), "writes": writes, **options})


def names(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_auto_lands_inert_writes_and_holds_an_importable_module(backend, tmp_path):
    (tmp_path / "old.txt").write_text("old\n")
    (tmp_path / "gone.txt").write_text("bye\n")
    r = run_command_isolated(
        "echo data > out.csv; echo new > old.txt; rm gone.txt; mkdir d; echo a > d/a.txt; "
        "echo 'print(1)' > helper.py", spec_for(tmp_path, "auto"), mode=backend, reuse=False)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.csv").read_text() == "data\n"
    assert (tmp_path / "old.txt").read_text() == "new\n"
    assert not (tmp_path / "gone.txt").exists()
    assert (tmp_path / "d" / "a.txt").read_text() == "a\n"
    assert not (tmp_path / "helper.py").exists()  # a kernel there would import it
    status = {c.path: c.status for c in r.changes}
    assert status == {"out.csv": "applied", "old.txt": "applied", "gone.txt": "applied",
                      "d": "applied", "d/a.txt": "applied", "helper.py": "held"}
    held = r.held[0]
    assert held.kind == "added" and held.held_reason.startswith("importable")
    assert r.details["writes"] == "auto: 5 applied, 1 held for review"
    assert any("held for review" in w for w in r.warnings())
    r.apply(["helper.py"])
    assert (tmp_path / "helper.py").read_text() == "print(1)\n"
    assert r.held == []


def test_review_holds_everything_until_applied_path_by_path(backend, tmp_path):
    r = run_command_isolated("echo 1 > a.csv; echo 2 > b.csv", spec_for(tmp_path, "review"),
                             mode=backend, reuse=False)
    assert names(tmp_path) == []
    assert {c.path for c in r.held} == {"a.csv", "b.csv"}
    report = r.apply(["a.csv"])
    assert report.applied == ["a.csv"]
    assert names(tmp_path) == ["a.csv"]
    r.discard()
    assert names(tmp_path) == ["a.csv"]
    assert [c.status for c in r.changes] == ["applied", "discarded"]
    assert r.writes.store is not None and not os.path.exists(r.writes.store)


def test_a_held_file_in_a_new_directory_stays_off_the_host(backend, tmp_path):
    r = run_command_isolated("mkdir sub; echo a > sub/a.txt; echo 'import os' > sub/conftest.py",
                             spec_for(tmp_path, "auto"), mode=backend, reuse=False)
    assert (tmp_path / "sub" / "a.txt").read_text() == "a\n"
    assert not (tmp_path / "sub" / "conftest.py").exists()
    assert [c.path for c in r.held] == ["sub/conftest.py"]


def test_a_killed_command_leaves_nothing_and_its_own_exit_status_keeps_its_writes(
        backend, tmp_path):
    spec = spec_for(tmp_path, "auto")
    r = run_command_isolated("echo x > timed.txt; sleep 60", spec, mode=backend, reuse=False,
                             timeout=3)
    assert r.timed_out
    assert not (tmp_path / "timed.txt").exists()
    assert "none reached" in r.details["writes"] or "discarded" in r.details["writes"]
    r = run_command_isolated("echo y > signalled.txt; kill -9 $$", spec, mode=backend,
                             reuse=False)
    assert r.returncode == -9 and not (tmp_path / "signalled.txt").exists()
    r = run_command_isolated("echo z > kept.txt; exit 200", spec, mode=backend, reuse=False)
    assert r.returncode == 200
    assert (tmp_path / "kept.txt").read_text() == "z\n"  # as git's exit 128 would


def test_the_host_folder_is_read_only_to_the_sandbox_and_protections_hold(backend, tmp_path):
    """The overlay's lower is the host folder: protected paths bound below the working dir
    (a hidden key, a read-only repository) are bound again on top of the overlay."""
    key = tmp_path / ".ssh" / "id_ed25519"
    key.parent.mkdir()
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "file").write_text("original\n")
    r = run_command_isolated(
        "cat .ssh/id_ed25519; echo ---; echo changed > repo/file; echo rc=$?",
        spec_for(tmp_path, "auto", repo_path=str(repo)), mode=backend, reuse=False)
    assert "secret" not in r.stdout
    assert "rc=0" not in r.stdout  # the repository stays read-only above the overlay
    assert "Read-only file system" in r.stderr
    assert (repo / "file").read_text() == "original\n"
    assert key.read_text().endswith("secret\n")
    assert r.changes == []


def test_a_host_edit_during_the_command_is_a_conflict_not_overwritten(backend, tmp_path):
    shared = tmp_path / "shared.txt"
    shared.write_text("before\n")
    time.sleep(0.05)  # older than the start by more than the clock's slack
    started = threading.Event()

    def edit() -> None:
        started.wait(30)
        time.sleep(0.5)
        shared.write_text("host edit\n")

    editor = threading.Thread(target=edit)
    editor.start()

    def seen(_name: str, _text: str) -> None:
        started.set()

    try:
        r = run_command_isolated("echo go; sleep 2; echo sandbox > shared.txt",
                                 spec_for(tmp_path, "auto"), mode=backend, reuse=False,
                                 on_output=seen)
    finally:
        started.set()
        editor.join()
    assert shared.read_text() == "host edit\n"
    change = next(c for c in r.changes if c.path == "shared.txt")
    assert change.status == "held" and "changed on the host" in change.held_reason
    report = r.apply(["shared.txt"])
    assert "shared.txt" in report.conflicts
    assert shared.read_text() == "host edit\n"
    r.discard()


def test_reused_and_session_commands_hold_writes_too(backend, tmp_path):
    spec = spec_for(tmp_path, "auto")
    results = [run_command_isolated(f"echo {i} > n{i}.csv; echo 'x=1' > m{i}.py", spec,
                                    mode=backend) for i in range(3)]
    assert "reused" in results[-1].details  # the warm pool ran it
    for i, r in enumerate(results):
        assert (tmp_path / f"n{i}.csv").read_text() == f"{i}\n"
        assert [c.path for c in r.held] == [f"m{i}.py"]
    assert not list(tmp_path.glob("m*.py"))
    with IsolatedSession(spec, mode=backend) as session:
        first = session.run("echo s > s.csv; echo 'y=2' > s.py")
        second = session.run("ls; cat s.csv")
    assert (tmp_path / "s.csv").read_text() == "s\n"
    assert [c.path for c in first.held] == ["s.py"]
    assert "s.csv" in second.stdout
    assert not (tmp_path / "s.py").exists()


def test_the_subprocess_backend_refuses_to_hold_writes(tmp_path):
    with pytest.raises(IsolationUnavailable, match="cannot hold writes"):
        run_command_isolated("echo x > f", spec_for(tmp_path, "review"), mode="subprocess")
    assert names(tmp_path) == []


def test_a_session_sees_its_held_changes_until_they_are_applied_or_discarded(backend,
                                                                             tmp_path):
    with IsolatedSession(spec_for(tmp_path, "auto"), mode=backend) as session:
        first = session.run("echo 'x = 1' > tool.py; mkdir pkg; echo 'y' > pkg/conftest.py; "
                            "echo data > out.csv")
        assert [c.path for c in session.changes()] == ["pkg/conftest.py", "tool.py"]
        assert [c.path for c in first.held] == ["pkg/conftest.py", "tool.py"]
        assert sorted(os.listdir(tmp_path)) == ["out.csv"]
        seen = session.run("cat tool.py pkg/conftest.py")
        assert seen.stdout == "x = 1\ny\n"  # the session sees what it holds
        assert session.discard(["tool.py"]) == ["discarded tool.py"]
        gone = session.run("cat tool.py")
        assert gone.returncode != 0  # discarded: gone from the session too
        edited = session.run("echo 'z' > pkg/conftest.py")
        assert [c.path for c in session.changes()] == ["pkg/conftest.py"]
        assert session.changes()[0] is edited.held[0]  # the newest version is the one held
        assert "applied pkg/conftest.py" in session.apply()
        assert (tmp_path / "pkg" / "conftest.py").read_text() == "z\n"
        assert session.changes() == []
        again = session.run("cat pkg/conftest.py; ls")
        assert again.stdout.splitlines()[0] == "z"
    assert sorted(names(tmp_path)) == ["out.csv", "pkg", "pkg/conftest.py"]
