"""Package-level promises: the runner core does not import IPython or widgets."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_ipython_widgets_or_docker():
    code = ("import sys, gvisor_magic\n"
            "from gvisor_magic import run_command_isolated, detect_environment\n"
            "print(sorted(m for m in ('IPython', 'ipywidgets', 'ipykernel', 'docker')"
            " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_public_names():
    import gvisor_magic

    for name in ("run_command_isolated", "is_gvisor_available", "detect_environment",
                 "CommandResult", "IsolationUnavailable", "load_ipython_extension",
                 "unload_ipython_extension", "status_widget", "Limits"):
        assert name in gvisor_magic.__all__ and hasattr(gvisor_magic, name)
