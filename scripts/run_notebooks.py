#!/usr/bin/env python3
"""Run notebooks/ in place and save their outputs (what nbval later compares with).

    python3 scripts/run_notebooks.py [NAME.ipynb ...]

Runs each notebook top to bottom in a fresh kernel of this Python, in the notebook's own
directory, with the same environment as the nbval tests (no GVISOR_MAGIC_* settings, a
scratch TMPDIR), so the saved outputs are those of the auto-chosen backend here (runsc
on a machine with gVisor, which is what the saved outputs must show).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CLEARED = ("GVISOR_MAGIC_MODE", "GVISOR_MAGIC_REQUIRE_ISOLATION", "GVISOR_MAGIC_RUNSC",
           "GVISOR_MAGIC_RUNSC_FLAGS", "GVISOR_MAGIC_DOCKER_RUNTIME", "GVISOR_MAGIC_IMAGE",
           "GVISOR_MAGIC_STATE_DIR")


def main(argv: list[str]) -> int:
    names = argv or sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
    scratch = tempfile.mkdtemp(prefix="gvm-notebooks-")
    saved = {name: os.environ.pop(name) for name in CLEARED if name in os.environ}
    os.environ["TMPDIR"] = scratch
    try:
        for name in names:
            path = NOTEBOOKS / name
            notebook = nbformat.read(path, as_version=4)
            print(f"running {name} ...", flush=True)
            NotebookClient(notebook, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
            nbformat.write(notebook, path)
    finally:
        os.environ.update(saved)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
