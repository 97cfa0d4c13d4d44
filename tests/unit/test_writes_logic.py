"""Held writes without a sandbox: a layer as the sandbox's init copies it out, read, judged
and applied by ``gvisor_magic.writes``; the notebook's list of held changes; the init's
reading of mount points. The real sandboxes are tests/test_writes.py's."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from gvisor_magic import InvalidRequestError, SandboxSpec
from gvisor_magic.activity import HostContext
from gvisor_magic.changes import start_stamp
from gvisor_magic.notebook.review import plain
from gvisor_magic.sandboxed import cow_layer
from gvisor_magic.writes import REVIEW, HeldChanges, take_writes

HOST = HostContext.build(sys_path=[], path="/usr/bin:/bin", home="/nonexistent-home")


def copied_out(tmp_path: Path, files: dict[str, str], deleted: tuple[str, ...] = ()) -> str:
    """A status dir as ``cow_layer.layer_copy_out`` leaves it."""
    status = tmp_path / "run" / "status"
    upper = status / "upper"
    upper.mkdir(parents=True)
    for rel, text in files.items():
        path = upper / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (status / "markers.json").write_text(json.dumps({"deleted": list(deleted), "opaque": [],
                                                     "skipped": []}))
    (status / "done").touch()
    return str(status)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    (path / "gone.txt").write_text("x")
    time.sleep(0.02)  # a few clock ticks: the host's file is older than the command
    return path


def test_auto_applies_what_no_host_tool_runs_and_holds_the_rest(tmp_path, work):
    status = copied_out(tmp_path, {"data.csv": "1", "new/a.txt": "a", "new/conftest.py": "x",
                                   "tool.py": "import os"}, deleted=("gone.txt",))
    writes = take_writes("auto", str(work), status, started_ns=start_stamp(),
                         completed=True, host=HOST)
    assert {c.path: c.status for c in writes.changes} == {
        "data.csv": "applied", "gone.txt": "applied", "new": "applied",
        "new/a.txt": "applied", "new/conftest.py": "held", "tool.py": "held"}
    assert sorted(os.listdir(work)) == ["data.csv", "new"]
    assert os.listdir(work / "new") == ["a.txt"]  # its held sibling stays off the host
    assert writes.describe() == "auto: 4 applied, 2 held for review"
    assert os.path.isdir(writes.store)
    writes.discard(["tool.py"])
    writes.apply()  # every pending change: the one left
    assert (work / "new" / "conftest.py").read_text() == "x"
    assert not (work / "tool.py").exists()
    assert not os.path.exists(writes.store)  # nothing pending: the store is gone


def test_auto_applies_a_new_empty_directory(tmp_path, work):
    status = copied_out(tmp_path, {})
    os.mkdir(os.path.join(status, "upper", "empty"))
    writes = take_writes("auto", str(work), status, started_ns=start_stamp(),
                         completed=True, host=HOST)
    assert [(c.path, c.status) for c in writes.changes] == [("empty", "applied")]
    assert (work / "empty").is_dir()


def test_review_holds_every_change(tmp_path, work):
    status = copied_out(tmp_path, {"data.csv": "1"})
    writes = take_writes("review", str(work), status, started_ns=start_stamp(),
                         completed=True, host=HOST)
    assert [(c.path, c.held_reason) for c in writes.held()] == [("data.csv", REVIEW)]
    assert not (work / "data.csv").exists()
    writes.close()
    assert not os.path.exists(writes.store)


def test_a_layer_without_its_done_mark_gives_nothing(tmp_path, work):
    status = copied_out(tmp_path, {"data.csv": "1"})
    os.unlink(os.path.join(status, "done"))
    writes = take_writes("auto", str(work), status, started_ns=start_stamp(),
                         completed=True, host=HOST)
    assert writes.changes == [] and "none reached" in writes.lost
    assert not (work / "data.csv").exists()


def test_a_command_that_did_not_end_on_its_own_lands_nothing(tmp_path, work):
    status = copied_out(tmp_path, {"data.csv": "1"})
    writes = take_writes("auto", str(work), status, started_ns=start_stamp(),
                         completed=False, host=HOST)
    assert [c.status for c in writes.changes] == ["discarded"]
    assert "discarded" in writes.describe()
    assert not (work / "data.csv").exists() and not os.path.exists(writes.store)


def test_the_notebook_lists_held_changes_and_acts_on_them_by_path(tmp_path, work):
    status = copied_out(tmp_path, {"a.py": "1", "b.py": "2", "c.csv": "3"})
    writes = take_writes("auto", str(work), status, started_ns=start_stamp(),
                         completed=True, host=HOST)
    held = HeldChanges()
    held.add(writes)
    text = plain(writes)
    assert "+ a.py" in text and "+ b.py" in text and "c.csv" not in text
    assert "%isolation apply PATH" in text and "%isolation discard" in text
    assert held.apply(["a.py", "nope"]) == ["applied a.py", "nope: no held change there"]
    assert held.discard() == ["discarded b.py"]
    assert held.pending() == []
    assert sorted(os.listdir(work)) == ["a.py", "c.csv", "gone.txt"]


def test_writes_is_a_checked_setting(tmp_path):
    assert SandboxSpec.from_options({"writes": "auto"}).writes == "auto"
    default = SandboxSpec()
    assert default.writes is None and default.writes_mode == "auto"
    assert not default.holds_writes  # no working dir: nothing to hold
    assert SandboxSpec.from_options({"working_dir": str(tmp_path)}).holds_writes
    kernel = SandboxSpec.from_options({"working_dir": str(tmp_path), "kernel_dir": str(tmp_path)})
    assert kernel.holds_writes  # a gVisor kernel's cells too (kernel/cells.py)
    assert not dataclasses.replace(kernel, writes="direct").holds_writes
    with pytest.raises(InvalidRequestError, match="'auto' holds back"):
        SandboxSpec.from_options({"writes": "later"})
    with pytest.raises(TypeError):
        SandboxSpec.from_options({"writes": True})


def test_the_init_reads_mount_points_below_the_working_dir(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "20 1 0:1 / / ro - overlay none ro\n"
        "30 20 0:2 / /home/u/work rw,nosuid - 9p a rw\n"
        "31 30 0:3 / /home/u/work/.ssh ro - tmpfs none ro\n"
        "32 30 0:4 / /home/u/work/my\\040dir/.git/hooks ro,nosuid - 9p a ro\n"
        "33 20 0:5 / /home/u/workshop rw - 9p a rw\n")
    assert cow_layer.submounts("/home/u/work", str(info)) == [
        ("/home/u/work/.ssh", True), ("/home/u/work/my dir/.git/hooks", True)]


def _copied(out: Path) -> tuple[set[str], dict]:
    """(files copied, markers) of one ``layer_copy_out`` into ``out``."""
    if (out / "done").read_text() == "empty":
        return set(), {}
    files = {str(p.relative_to(out / "upper")) for p in (out / "upper").rglob("*")
             if p.is_file()}
    return files, json.loads((out / "markers.json").read_text())


def test_a_layer_copied_out_twice_gives_only_what_changed_since(tmp_path):
    """A gVisor kernel's cells: each copy of the one overlay has what changed since the last
    (unchanged files left out, an opaque dir listed once, a file gone without a marker
    listed as deleted)."""
    upper = tmp_path / "upper"
    (upper / "pkg").mkdir(parents=True)
    (upper / "a.csv").write_text("1")
    (upper / "pkg" / "mod.py").write_text("x = 1")
    layer = {"upper": str(upper), "made": [], "count": 1, "switch": False, "copied": {}}

    def copy(n: int) -> tuple[set[str], dict]:
        out = tmp_path / f"out{n}"
        cow_layer.layer_copy_out(layer, str(out))
        return _copied(out)

    files, markers = copy(1)
    assert files == {"a.csv", "pkg/mod.py"} and markers["deleted"] == []
    assert copy(2) == (set(), {})  # nothing changed since
    time.sleep(0.01)
    (upper / "pkg" / "mod.py").write_text("x = 2")
    (upper / "b.txt").write_text("new")
    files, markers = copy(3)
    assert files == {"pkg/mod.py", "b.txt"}
    (upper / "a.csv").unlink()  # gone from the upper with no whiteout
    files, markers = copy(4)
    assert files == set() and markers["deleted"] == ["a.csv"]
    assert copy(5) == (set(), {})
