"""The subprocess backend says when something a command started could not be killed.

The reaper writes ``left PID...`` on its report pipe after its bounded kill; the backend
turns the pids still alive into the result's ``error``, and says nothing when none is.
"""

from __future__ import annotations

import os
from pathlib import Path

from gvisor_magic.backends.subprocess import _cgroup_parents, _Tree

#: A pid no process has (pids stay below ``pid_max``).
NO_PROCESS = int(Path("/proc/sys/kernel/pid_max").read_text())


def _tree_reading(report: bytes) -> _Tree:
    read, write = os.pipe()
    os.write(write, report)
    os.close(write)
    tree = _Tree(NO_PROCESS, None, read)  # nothing to remember or kill
    tree.close()
    return tree


def test_a_survivor_reported_by_the_reaper_is_said_in_the_error() -> None:
    alive = os.getpid()  # certainly alive: this test itself
    error = _tree_reading(f"left {alive}\n".encode()).left_running()
    assert error is not None and "could not be killed" in error and str(alive) in error
    assert error.startswith("1 processes")


def test_nothing_left_or_only_dead_pids_is_no_error() -> None:
    assert _tree_reading(b"left \n").left_running() is None
    assert _tree_reading(b"").left_running() is None  # a reaper that was killed says nothing
    assert _tree_reading(f"left {NO_PROCESS}\n".encode()).left_running() is None


def test_cgroup_hierarchies_are_listed_best_first() -> None:
    order = {"v2": 0, "freezer": 1, "v1": 2}
    kinds = [kind for kind, _path in _cgroup_parents()]
    assert kinds == sorted(kinds, key=order.__getitem__)
    assert all(os.path.isdir(path) for _kind, path in _cgroup_parents())
