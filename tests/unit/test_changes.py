"""A command's change set: read out of an overlay upper, applied to the working dir, discarded.

The uppers here are built by hand in the layout overlayfs writes: whiteouts are 0/0
character devices (only as root) or listed (``ListedMarkers``), opaque directories carry
``user.overlay.opaque=y`` or are listed. No sandbox runs.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from gvisor_magic import changes
from gvisor_magic.changes import (
    ChangeConflict,
    ListedMarkers,
    OverlayMarkers,
    UnsafePath,
    UpperLayoutError,
    apply,
    discard,
    read_upper,
    snapshot_lower,
)

ROOT = os.geteuid() == 0


def _xattrs_work(where: Path) -> bool:
    probe = where / "xattr-probe"
    probe.mkdir()
    try:
        os.setxattr(probe, "user.overlay.opaque", b"y")
    except OSError:
        return False
    return True


class Layers:
    """A lower (the working dir) and an upper, and the markers that say what the upper means.

    ``style`` is "device" (whiteouts are 0/0 character devices, opaque is an xattr: what
    overlayfs writes) or "listed" (both given as lists).
    """

    def __init__(self, root: Path, style: str) -> None:
        self.lower = root / "work"
        self.upper = root / "upper"
        self.lower.mkdir()
        self.upper.mkdir()
        self.style = style
        self.listed = ListedMarkers()

    def markers(self) -> OverlayMarkers:
        return self.listed if self.style == "listed" else OverlayMarkers()

    def low(self, rel: str, data: bytes | str = b"", mode: int = 0o644) -> Path:
        return _write(self.lower / rel, data, mode)

    def up(self, rel: str, data: bytes | str = b"", mode: int = 0o644) -> Path:
        return _write(self.upper / rel, data, mode)

    def up_dir(self, rel: str, mode: int = 0o755) -> Path:
        path = self.upper / rel
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        return path

    def whiteout(self, rel: str) -> None:
        path = self.upper / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.style == "device":
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        else:
            self.listed.deleted.add(rel)

    def opaque(self, rel: str) -> None:
        path = self.up_dir(rel)
        if self.style == "device":
            os.setxattr(path, "user.overlay.opaque", b"y")
        else:
            self.listed.opaque.add(rel)

    def read(self, **kwargs: object) -> changes.ChangeSet:
        return read_upper(self.upper, self.lower, markers=self.markers(), **kwargs)


def _write(path: Path, data: bytes | str, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


@pytest.fixture(params=["device", "listed"])
def layers(request: pytest.FixtureRequest, tmp_path: Path) -> Layers:
    if request.param == "device":
        if not ROOT:
            pytest.skip("whiteouts (0/0 character devices) need root")
        if not _xattrs_work(tmp_path):
            pytest.skip(f"no user xattrs on {tmp_path}'s filesystem")
    return Layers(tmp_path, request.param)


@pytest.fixture
def plain(tmp_path: Path) -> Layers:
    """Layers whose cases need no whiteout or opaque marker."""
    return Layers(tmp_path, "listed")


def _kinds(cs: changes.ChangeSet) -> dict[str, str]:
    return {c.path: c.kind for c in cs}


def _tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


# --- read-out ---------------------------------------------------------------------------


def test_added_and_modified_files_carry_diffs_and_an_unchanged_copy_up_is_no_change(
        plain: Layers) -> None:
    plain.low("keep.txt", "same\n")
    plain.low("edit.txt", "one\ntwo\n")
    plain.up("keep.txt", "same\n")  # copied up, not changed
    plain.up("edit.txt", "one\nTWO\n")
    plain.up("new.txt", "hello\n")
    cs = plain.read()
    assert _kinds(cs) == {"edit.txt": "modified", "new.txt": "added"}
    assert "-two\n+TWO\n" in cs["edit.txt"].diff
    assert cs["new.txt"].diff.startswith("--- /dev/null\n+++ b/new.txt\n")
    assert cs["new.txt"].size == 6 and stat.S_IMODE(cs["new.txt"].mode) == 0o644
    assert cs.lower_state["new.txt"] is None
    assert cs.lower_state["edit.txt"].size == 8


def test_binary_and_large_files_have_no_diff(plain: Layers) -> None:
    plain.up("blob.bin", b"\x00\x01\xff")
    plain.up("latin1.txt", "caf\xe9\n".encode("latin-1"))
    plain.up("big.txt", "x" * (changes.DIFF_LIMIT + 1))
    plain.up("edge.txt", "y" * changes.DIFF_LIMIT)
    cs = plain.read()
    assert [c.path for c in cs if c.diff is not None] == ["edge.txt"]
    assert cs["big.txt"].size == changes.DIFF_LIMIT + 1


def test_deleted_files_and_directories(layers: Layers) -> None:
    layers.low("gone.txt", "bye\n")
    layers.low("old/a.txt", "a")
    layers.low("old/deep/b.txt", "b")
    layers.low("stays.txt", "s")
    layers.whiteout("gone.txt")
    layers.whiteout("old")
    layers.whiteout("never-existed")  # nothing in the lower: no change
    cs = layers.read()
    assert _kinds(cs) == {p: "deleted" for p in
                          ["gone.txt", "old", "old/a.txt", "old/deep", "old/deep/b.txt"]}
    assert cs["old"].is_dir and not cs["gone.txt"].is_dir and cs["gone.txt"].size == 4

    report = apply(cs)
    assert report.ok, report.conflicts
    assert _tree(layers.lower) == {"stays.txt": b"s"}


def test_a_deleted_directory_the_host_added_to_is_kept(layers: Layers) -> None:
    layers.low("old/a.txt", "a")
    layers.whiteout("old")
    cs = layers.read()
    (layers.lower / "old" / "mine.txt").write_text("written on the host meanwhile")
    report = apply(cs)
    assert report.applied == ["old/a.txt"]
    assert isinstance(report.conflicts["old"], ChangeConflict)
    assert "does not delete" in str(report.conflicts["old"])
    assert _tree(layers.lower) == {"old": "dir", "old/mine.txt": b"written on the host meanwhile"}


def test_an_opaque_directory_hides_everything_below_it_in_the_lower(layers: Layers) -> None:
    layers.low("d/a.txt", "a")
    layers.low("d/b.txt", "b")
    layers.low("d/sub/c.txt", "c")
    layers.low("d/sub/keep.txt", "k")
    layers.opaque("d")
    layers.up("d/b.txt", "B")
    layers.up("d/new.txt", "n")
    layers.up_dir("d/sub")
    layers.up("d/sub/keep.txt", "k")
    cs = layers.read()
    assert _kinds(cs) == {"d/a.txt": "deleted", "d/b.txt": "modified", "d/new.txt": "added",
                          "d/sub/c.txt": "deleted"}
    assert apply(cs).ok
    assert _tree(layers.lower) == {"d": "dir", "d/b.txt": b"B", "d/new.txt": b"n",
                                   "d/sub": "dir", "d/sub/keep.txt": b"k"}


@pytest.mark.skipif(not ROOT, reason="trusted.* xattrs need root")
def test_a_root_overlay_marks_opaque_directories_with_trusted_xattrs(plain: Layers) -> None:
    plain.low("d/a.txt", "a")
    plain.up("d/b.txt", "b")
    try:
        os.setxattr(plain.upper / "d", "trusted.overlay.opaque", b"y")
    except OSError as e:
        pytest.skip(f"no trusted xattrs here: {e}")
    cs = read_upper(plain.upper, plain.lower)  # OverlayMarkers, the default
    assert _kinds(cs) == {"d/a.txt": "deleted", "d/b.txt": "added"}


def test_without_the_opaque_marker_the_lower_contents_stay(plain: Layers) -> None:
    plain.low("d/a.txt", "a")
    plain.up("d/new.txt", "n")
    assert _kinds(plain.read()) == {"d/new.txt": "added"}


def test_a_directory_replaced_by_a_file_and_a_file_by_a_directory(plain: Layers) -> None:
    plain.low("was_dir/x.txt", "x")
    plain.low("was_file", "f")
    plain.up("was_dir", "now a file")
    plain.up("was_file/inside.txt", "i")
    cs = plain.read()
    assert _kinds(cs) == {"was_dir": "modified", "was_dir/x.txt": "deleted",
                          "was_file": "modified", "was_file/inside.txt": "added"}
    assert cs["was_file"].is_dir and not cs["was_dir"].is_dir
    report = apply(cs)
    assert report.ok, report.conflicts
    assert _tree(plain.lower) == {"was_dir": b"now a file", "was_file": "dir",
                                  "was_file/inside.txt": b"i"}


def test_added_directories_are_one_change_each_with_their_contents(plain: Layers) -> None:
    plain.up("pkg/mod/__init__.py", "")
    plain.up_dir("pkg/empty")
    cs = plain.read()
    assert _kinds(cs) == {"pkg": "added", "pkg/empty": "added", "pkg/mod": "added",
                          "pkg/mod/__init__.py": "added"}
    assert [c.path for c in cs] == ["pkg", "pkg/empty", "pkg/mod", "pkg/mod/__init__.py"]


def test_devices_and_fifos_in_the_upper_are_never_applied(plain: Layers) -> None:
    os.mkfifo(plain.upper / "pipe")
    cs = plain.read()
    assert len(cs) == 0 and "pipe" in cs.skipped


def test_an_upper_with_metacopy_files_is_refused(plain: Layers) -> None:
    path = plain.up("f.txt", "")
    try:
        os.setxattr(path, "user.overlay.metacopy", b"")
    except OSError as e:
        pytest.skip(f"no user xattrs here: {e}")
    with pytest.raises(UpperLayoutError, match="metacopy"):
        plain.read()


def test_listed_markers_load_from_a_file(tmp_path: Path) -> None:
    listing = tmp_path / "markers.json"
    listing.write_text('{"deleted": ["a/b.txt", "c"], "opaque": ["d/"]}')
    markers = ListedMarkers.load(listing)
    assert markers.deleted == {"a/b.txt", "c"} and markers.opaque == {"d"}
    for bad in ["../outside", "a/../../outside", "/etc/passwd"]:
        with pytest.raises(changes.ChangeError, match="inside the working dir"):
            ListedMarkers(deleted=[bad])


# --- apply: modes, symlinks -------------------------------------------------------------


def test_modes_are_kept_and_set_id_bits_removed(plain: Layers) -> None:
    plain.up("bin/tool", "#!/bin/sh\n", mode=0o4755)
    plain.up("bin/group", "#!/bin/sh\n", mode=0o2750)
    plain.up("secret.txt", "s", mode=0o600)
    plain.up("ro/inside.txt", "r", mode=0o444)
    (plain.upper / "ro").chmod(0o555)
    (plain.upper / "bin").chmod(0o2775)
    cs = plain.read()
    assert cs["bin/tool"].mode & stat.S_ISUID  # the change says what the command did
    report = apply(cs)
    assert report.ok, report.conflicts
    modes = {rel: stat.S_IMODE(os.lstat(plain.lower / rel).st_mode)
             for rel in ["bin", "bin/tool", "bin/group", "secret.txt", "ro", "ro/inside.txt"]}
    assert modes == {"bin": 0o775, "bin/tool": 0o755, "bin/group": 0o750, "secret.txt": 0o600,
                     "ro": 0o555, "ro/inside.txt": 0o444}
    assert "set-ID bits removed" in report.notes["bin/tool"]
    assert "bin/group" in report.notes and "secret.txt" not in report.notes


def test_a_link_to_etc_passwd_is_written_as_a_link_and_reported(plain: Layers) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    os.symlink("/etc/passwd", plain.upper / "passwd")
    os.symlink("../../outside", plain.upper / "climb")
    os.symlink("sub/inside", plain.upper / "fine")
    cs = plain.read()
    assert cs["passwd"].symlink == "/etc/passwd" and cs["passwd"].link_leaves_workdir
    assert cs["climb"].link_leaves_workdir and not cs["fine"].link_leaves_workdir
    report = apply(cs)
    assert report.ok, report.conflicts
    assert os.readlink(plain.lower / "passwd") == "/etc/passwd"
    assert (plain.lower / "passwd").is_symlink()
    assert "outside the working dir" in report.notes["passwd"] and "fine" not in report.notes
    assert Path("/etc/passwd").read_bytes() == passwd


def test_a_link_replacing_a_host_file_replaces_it_and_never_writes_through(
        plain: Layers, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    plain.low("config", "host config")
    os.symlink(outside, plain.upper / "config")
    plain.up("note.txt", "n")
    cs = plain.read()
    assert cs["config"].kind == "modified"
    assert apply(cs).ok
    assert os.readlink(plain.lower / "config") == str(outside)
    assert outside.read_text() == "outside"


def test_a_host_link_to_a_file_is_replaced_not_followed(plain: Layers, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    os.symlink(outside, plain.lower / "target")
    plain.up("target", "new contents")
    cs = plain.read()
    assert apply(cs).ok
    assert not (plain.lower / "target").is_symlink()
    assert (plain.lower / "target").read_text() == "new contents"
    assert outside.read_text() == "outside"


# --- apply: conflicts and a working dir that changed ------------------------------------


def test_a_host_file_changed_after_the_read_out_is_a_conflict_and_other_paths_apply(
        plain: Layers) -> None:
    plain.low("shared.txt", "original\n")
    plain.up("shared.txt", "from the command\n")
    plain.up("other.txt", "other\n")
    cs = plain.read()
    (plain.lower / "shared.txt").write_text("edited by the user\n")
    report = apply(cs)
    assert report.applied == ["other.txt"]
    assert isinstance(report.conflicts["shared.txt"], ChangeConflict)
    assert (plain.lower / "shared.txt").read_text() == "edited by the user\n"
    assert cs["shared.txt"].applied is None
    with pytest.raises(ChangeConflict, match=r"shared\.txt"):
        report.raise_for_conflicts()


def test_a_path_created_on_the_host_is_not_overwritten(plain: Layers) -> None:
    plain.up("new.txt", "command")
    cs = plain.read()
    (plain.lower / "new.txt").write_text("user")
    report = apply(cs)
    assert "created on the host" in str(report.conflicts["new.txt"])
    assert (plain.lower / "new.txt").read_text() == "user"


def test_a_host_edit_while_the_command_ran_is_caught_by_a_snapshot(plain: Layers) -> None:
    plain.low("a.txt", "a")
    plain.low("b.txt", "b")
    before = snapshot_lower(plain.lower, ["a.txt", "b.txt", "c.txt"])
    (plain.lower / "a.txt").write_text("edited during the command")  # the user, meanwhile
    (plain.lower / "c.txt").write_text("created during the command")
    plain.up("a.txt", "command")
    plain.up("b.txt", "command")
    plain.up("c.txt", "command")
    cs = plain.read(baseline=before)
    assert set(cs.changed_during) == {"a.txt", "c.txt"}
    report = apply(cs)
    assert report.applied == ["b.txt"] and set(report.conflicts) == {"a.txt", "c.txt"}
    assert (plain.lower / "a.txt").read_text() == "edited during the command"


def test_a_host_edit_while_the_command_ran_is_caught_by_the_start_time(plain: Layers) -> None:
    plain.low("old.txt", "o")
    plain.low("edited.txt", "e")
    past = time.time_ns() - 3_600 * 10**9
    os.utime(plain.lower / "old.txt", ns=(past, past))  # mtime only: ctime is still now
    started = time.time_ns() + 10**9  # as if both were older
    plain.up("old.txt", "O")
    plain.up("edited.txt", "E")
    cs = plain.read(started_ns=started)
    assert cs.changed_during == {}
    started_before_the_edit = os.lstat(plain.lower / "edited.txt").st_ctime_ns - 1
    cs = plain.read(started_ns=started_before_the_edit)
    assert set(cs.changed_during) == {"edited.txt", "old.txt"}


def test_a_lower_directory_swapped_for_a_symlink_is_never_written_through(
        plain: Layers, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "existing.txt").write_text("outside")
    plain.low("sub/existing.txt", "inside")
    plain.low("sub/gone.txt", "g")
    plain.up("sub/existing.txt", "command")
    plain.up("sub/new.txt", "command")
    plain.up("sub/deeper/x.txt", "command")
    plain.listed.deleted.add("sub/gone.txt")
    cs = plain.read()
    assert _kinds(cs) == {"sub/deeper": "added", "sub/deeper/x.txt": "added",
                          "sub/existing.txt": "modified", "sub/gone.txt": "deleted",
                          "sub/new.txt": "added"}
    (plain.lower / "sub").rename(tmp_path / "moved-away")
    os.symlink(outside, plain.lower / "sub")
    before = _tree(outside)

    report = apply(cs)
    assert report.applied == []
    assert set(report.conflicts) == set(_kinds(cs))
    assert all(isinstance(e, UnsafePath) for e in report.conflicts.values())
    assert "symlink" in str(report.conflicts["sub/new.txt"])
    assert _tree(outside) == before


def test_a_failed_copy_leaves_no_temporary_file_and_the_old_file_whole(
        plain: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    plain.low("data.txt", "old contents")
    plain.up("data.txt", "new contents " * 1000)
    plain.up("other.txt", "fine")
    cs = plain.read()

    def half_then_fail(src: int, dst: int, size: int) -> None:
        os.write(dst, os.read(src, size // 2))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(changes, "_copy_data", half_then_fail)
    report = apply(cs)
    assert set(report.conflicts) == {"data.txt", "other.txt"}
    assert "No space left" in str(report.conflicts["data.txt"])
    assert sorted(os.listdir(plain.lower)) == ["data.txt"]
    assert (plain.lower / "data.txt").read_text() == "old contents"

    monkeypatch.undo()
    assert apply(cs).ok  # nothing was written: it applies once the disk has room
    assert (plain.lower / "data.txt").read_text() == "new contents " * 1000


def test_applying_twice_is_harmless(layers: Layers) -> None:
    layers.low("gone.txt", "g")
    layers.whiteout("gone.txt")
    layers.up("dir/new.txt", "n")
    cs = layers.read()
    first = apply(cs)
    assert first.ok and sorted(first.applied) == ["dir", "dir/new.txt", "gone.txt"]
    after = _tree(layers.lower)
    second = apply(cs)
    assert second.applied == [] and second.ok
    assert second.skipped == dict.fromkeys(["dir", "dir/new.txt", "gone.txt"], "already applied")
    assert _tree(layers.lower) == after
    assert all(c.status == "applied" for c in cs)


def test_held_changes_wait_for_an_explicit_apply(plain: Layers) -> None:
    plain.up("inert.txt", "i")
    plain.up("hooks/post-checkout", "#!/bin/sh\n", mode=0o755)
    plain.up("venv/bin/activate", "export PATH")
    cs = plain.read()
    cs.hold("hooks/post-checkout", "runs on git checkout")
    cs.hold("venv", "a virtual environment")
    assert cs["hooks/post-checkout"].status == "held"
    first = apply(cs)
    assert first.applied == ["hooks", "inert.txt"]
    assert first.skipped == {"venv/bin": "waits for venv, held for review",
                             "venv/bin/activate": "waits for venv, held for review"}
    assert not (plain.lower / "hooks/post-checkout").exists()
    second = apply(cs, ["hooks/post-checkout"])
    assert second.applied == ["hooks/post-checkout"] and second.ok
    assert (plain.lower / "hooks/post-checkout").read_text() == "#!/bin/sh\n"


def test_selecting_a_path_brings_its_new_directories_and_its_contents(plain: Layers) -> None:
    plain.up("a/b/c.txt", "c")
    plain.up("a/b/d.txt", "d")
    plain.up("a/e.txt", "e")
    cs = plain.read()
    assert cs.select(["a/b/c.txt"]) == ["a", "a/b", "a/b/c.txt"]
    assert cs.select(["a/b"]) == ["a", "a/b", "a/b/c.txt", "a/b/d.txt"]
    with pytest.raises(changes.ChangeError, match="not in this change set"):
        cs.select(["nope"])
    assert apply(cs, ["a/b/c.txt"]).ok
    assert _tree(plain.lower) == {"a": "dir", "a/b": "dir", "a/b/c.txt": b"c"}


# --- discard ----------------------------------------------------------------------------


def test_discard_removes_the_changes_from_the_upper(layers: Layers) -> None:
    layers.low("gone.txt", "g")
    layers.low("edit.txt", "e")
    layers.whiteout("gone.txt")
    layers.up("edit.txt", "E")
    layers.up("new/deep/file.txt", "n")
    layers.up("keep.txt", "k")
    cs = layers.read()
    report = discard(cs, ["gone.txt", "edit.txt", "new"])
    assert sorted(report.discarded) == ["edit.txt", "gone.txt", "new", "new/deep",
                                        "new/deep/file.txt"]
    assert all(cs[p].status == "discarded" for p in report.discarded)
    assert _tree(layers.upper) == {"keep.txt": b"k"}
    assert _kinds(layers.read()) == {"keep.txt": "added"}  # gone from the upper for good

    applied = apply(cs)
    assert applied.applied == ["keep.txt"] and applied.skipped["edit.txt"] == "discarded"
    assert _tree(layers.lower) == {"edit.txt": b"e", "gone.txt": b"g", "keep.txt": b"k"}
    assert discard(cs).skipped["keep.txt"] == "already applied"


def test_discarding_a_deletion_below_an_opaque_directory_is_noted(layers: Layers) -> None:
    layers.low("d/a.txt", "a")
    layers.opaque("d")
    layers.up("d/b.txt", "b")
    cs = layers.read()
    report = discard(cs, ["d/a.txt"])
    assert report.discarded == ["d/a.txt"] and "still hidden" in report.notes["d/a.txt"]
    assert apply(cs).applied == ["d/b.txt"]
    assert (layers.lower / "d/a.txt").read_text() == "a"


def test_the_kinds_of_marker_are_pluggable(plain: Layers) -> None:
    class Dotted(OverlayMarkers):
        """An upper that spells a deletion as a ``.wh.NAME`` file (OCI layers do)."""

        def is_whiteout(self, rel: str, path: str, st: os.stat_result) -> bool:
            return os.path.basename(rel).startswith(".wh.")  # the marker itself is no change

        def listed_deletions(self) -> list[str]:
            return [str(p.relative_to(plain.upper)).replace(".wh.", "")
                    for p in plain.upper.rglob(".wh.*")]

    plain.low("x.txt", "x")
    plain.up(".wh.x.txt")
    cs = read_upper(plain.upper, plain.lower, markers=Dotted())
    assert _kinds(cs) == {"x.txt": "deleted"}


def test_the_classifier_reads_new_contents_and_what_exists_after(layers: Layers) -> None:
    layers.low("pkg/__init__.py", "")
    layers.low("old/x.py", "x")
    layers.low("d/a.py", "a")
    layers.whiteout("old")
    layers.opaque("d")
    layers.up("d/b.py", "b")
    layers.up("new/mod.py", "import os\n")
    layers.up("big.bin", b"z" * 2048)
    cs = layers.read()
    assert cs.content("new/mod.py") == b"import os\n"
    assert cs.content("big.bin", limit=1024) is None and cs.content("big.bin") == b"z" * 2048
    assert cs.content("new") is None and cs.content("old/x.py") is None
    assert cs.content("pkg/__init__.py") is None  # not a change
    after = {rel: cs.exists_after(rel) for rel in [
        "pkg/__init__.py", "old", "old/x.py", "d", "d/a.py", "d/b.py", "new/mod.py",
        "new/none.py", "nowhere.py"]}
    assert after == {"pkg/__init__.py": True, "old": False, "old/x.py": False, "d": True,
                     "d/a.py": False, "d/b.py": True, "new/mod.py": True,
                     "new/none.py": False, "nowhere.py": False}
    assert cs.exists_after(str(layers.lower / "pkg" / "__init__.py"))
    assert cs.exists_after("/etc/passwd")  # outside the working dir: the host's answer
