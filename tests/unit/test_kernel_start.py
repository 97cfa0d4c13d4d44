"""How the provisioner learns whether a launcher's sandbox started, how kernel dirs are
named, what a killed launcher's sandbox leaves and how the launcher takes a stop signal;
real child processes and pipes, no runsc (the real thing: tests/test_gvisor_kernel.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gvisor_magic.kernel.launch import _Stop
from gvisor_magic.kernel.starting import wait_for_start
from gvisor_magic.run_dirs import KERNEL_PREFIX as PREFIX
from gvisor_magic.run_dirs import kernel_owner_of as owner_of
from gvisor_magic.run_dirs import remove_run_dirs_of


def _launcher(code: str) -> tuple[int, subprocess.Popen]:
    """A child given the write end of a pipe as fd ``W`` in ``code``; returns the read end."""
    read_end, write_end = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", f"W = {write_end}\n{code}"],
                             pass_fds=(write_end,), stdin=subprocess.PIPE)
    os.close(write_end)
    return read_end, child


@pytest.mark.parametrize(("code", "expect"), [
    # Its sandbox runs: the kernel keeps running, and the answer does not wait for it to end.
    ("import os, sys\nos.write(W, b'ok\\n')\nsys.stdin.read()", None),
    ("import os, sys\nos.write(W, b'o'); os.write(W, b'k\\n')\nsys.stdin.read()", None),
    # It could not start one: its reason, whole.
    ("import os\nos.write(W, b'runsc: broken\\nsecond line')\nraise SystemExit(1)",
     "runsc: broken\nsecond line"),
    # It died without a word.
    ("raise SystemExit(3)", "its launcher exited with status 3"),
    ("import os\nos.close(W)\nimport sys\nsys.stdin.read()", "its launcher said nothing"),
])
def test_wait_for_start(code, expect) -> None:
    read_end, child = _launcher(code)
    try:
        assert wait_for_start(read_end, child, timeout=60) == expect
    finally:
        os.close(read_end)
        child.stdin.close()
        child.kill()
        child.wait()


def test_no_word_in_time_is_a_failure() -> None:
    read_end, child = _launcher("import sys\nsys.stdin.read()")
    try:
        assert wait_for_start(read_end, child, timeout=0.5) == \
            "no word from its launcher within 0s"
        assert child.poll() is None  # the caller kills it
    finally:
        os.close(read_end)
        child.stdin.close()
        child.kill()
        child.wait()


def test_kernel_dir_names() -> None:
    assert owner_of(f"{PREFIX}1234-ab_c9") == 1234
    for name in (f"{PREFIX}abcd1234", f"{PREFIX}12", f"{PREFIX}x-1", "gvisor-magic-1234-ab",
                 f"{PREFIX}1234-"):
        assert owner_of(name) is None, name


def test_what_a_killed_launcher_left_is_removed(tmp_path) -> None:
    """Its run dirs go, after what still mentions them (its sandbox's runsc) was killed;
    a live process's run dir, a kernel dir and other names stay."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f"gvisor-magic-{dead.pid}-abc_12"
    (left / "state").mkdir(parents=True)
    (left / "state" / "x").write_text("x")
    runsc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()",
                              str(left / "state")], stdin=subprocess.PIPE)
    keep = [tmp_path / f"gvisor-magic-{os.getpid()}-abc_12",
            tmp_path / f"{PREFIX}{dead.pid}-abc_12", tmp_path / f"gvisor-magic-{dead.pid}"]
    for path in keep:
        path.mkdir()
    try:
        assert remove_run_dirs_of(dead.pid, str(tmp_path)) == [str(left)]
        assert runsc.wait(timeout=10) == -9, "its sandbox's process was not killed"
    finally:
        runsc.kill()
        runsc.wait()
        runsc.stdin.close()
    assert not left.exists()
    assert all(path.exists() for path in keep)
    assert remove_run_dirs_of(os.getpid(), str(tmp_path)) == [], "a live process's dir went"


def test_a_stop_signal_interrupts_the_kernel_once_and_never_its_removal() -> None:
    stop = _Stop()
    stop(15, None)  # while the sandbox starts: noted only
    assert stop.requested and not stop.armed
    stop.armed = True
    with pytest.raises(KeyboardInterrupt):
        stop(15, None)  # the kernel runs: it is interrupted
    stop(15, None)  # again, as the sandbox is removed: noted only
    stop(1, None)
    assert stop.requested and not stop.armed
