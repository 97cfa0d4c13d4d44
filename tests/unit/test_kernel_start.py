"""How the provisioner learns whether a launcher's sandbox started, and how kernel dirs are
named; real child processes and pipes, no runsc (the real thing: tests/test_gvisor_kernel.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gvisor_magic.backends.kernel_dirs import PREFIX, owner_of
from gvisor_magic.kernel.provisioner import wait_for_start


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
