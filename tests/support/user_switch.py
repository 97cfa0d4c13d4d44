"""Helpers for tests that switch to an ordinary user."""

from __future__ import annotations

import os
import shutil
import tempfile


def world_readable_copy(*sources: str | os.PathLike[str]) -> str:
    """Copies of ``sources`` in a new directory every user can read (the caller removes it).

    Tests that switch to an ordinary user cannot read a private clone (``mktemp -d`` is
    0700, as root's home is), nor this venv: they run copies with the system's Python.
    """
    target = tempfile.mkdtemp(prefix="gvm-readable-")
    for source in map(str, sources):
        name = os.path.basename(source.rstrip("/"))
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(target, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, os.path.join(target, name))
    for directory, _dirs, files in os.walk(target):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return target
