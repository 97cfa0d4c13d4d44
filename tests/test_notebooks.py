"""notebooks/ under nbval: every cell runs again and its output is compared with the saved one.

The saved outputs come from a machine with runsc. The notebooks run twice: with gVisor
(compared with ``nbval_sanitize.cfg``, which evens out only timings and the host's kernel),
and forced onto the fallback (``GVISOR_MAGIC_MODE=subprocess``), where
``nbval_sanitize_fallback.cfg`` also evens out where each command ran and what it could
reach -- the notebooks' own checks still tell right from wrong there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from support.kernel_helpers import GVISOR_ENV
from support.leaks import wait_for_watchers

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
SANITIZE_FALLBACK = Path(__file__).resolve().parent / "nbval_sanitize_fallback.cfg"
SANITIZE_DOCKER = Path(__file__).resolve().parent / "nbval_sanitize_docker.cfg"
EXPECTED = ("01-quickstart.ipynb", "02-untrusted-code.ipynb", "03-limits-and-timeouts.ipynb",
            "04-python-api.ipynb", "05-agents.ipynb")


def code_cells() -> int:
    return sum(1 for name in EXPECTED
               for cell in nbformat.read(NOTEBOOKS / name, as_version=4).cells
               if cell.cell_type == "code")


def run_nbval(mode: str, sanitize_files: list[Path],
              plugins: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    """pytest --nbval on notebooks/ in its own TMPDIR; returns the run and outcome counts."""
    work = tempfile.mkdtemp(prefix="gvm-nbval-")
    try:
        sanitize = Path(work, "sanitize.cfg")
        sanitize.write_text("\n".join(path.read_text() for path in sanitize_files))
        kernel_tmp = Path(work, "tmp")
        kernel_tmp.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in GVISOR_ENV}
        env.update(GVISOR_MAGIC_MODE=mode, TMPDIR=str(kernel_tmp),
                   PYDEVD_DISABLE_FILE_VALIDATION="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                            env.get("PYTHONPATH")])))
        report = Path(work, "report.xml")
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
             *(arg for plugin in plugins for arg in ("-p", plugin)), "--nbval",
             "--nbval-current-env", f"--nbval-sanitize-with={sanitize}",
             "--nbval-cell-timeout=180", f"--junitxml={report}", "-q", str(NOTEBOOKS)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if report.exists():
            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {key: int(suite.get(key, 0)) for key in counts}
        # A kernel stopped at once (nbval's shutdown_kernel(now=True) is a SIGKILL) cannot
        # remove the sandbox it kept booted for a next call; its watcher does, when it saw
        # the kernel exit (run_dirs.watch_owner).
        waiting = wait_for_watchers(str(kernel_tmp))
        assert not waiting, f"processes still use the kernels' TMPDIR: {waiting}"
        left = os.listdir(kernel_tmp)
        assert not left, f"the notebooks' kernels left files in their TMPDIR: {left}"
        return run, counts
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check(run: subprocess.CompletedProcess, counts: dict) -> None:
    output = run.stdout[-8000:] + run.stderr[-2000:]
    assert run.returncode == 0, output
    # Every code cell is an nbval test; none is skipped wholesale.
    assert counts == {"tests": code_cells(), "failures": 0, "errors": 0, "skipped": 0}, output


@pytest.fixture
def untouched_notebooks():
    """The notebooks keep their files in a scratch dir: notebooks/ must not change."""
    before = {path.name: path.read_bytes() for path in NOTEBOOKS.iterdir()}
    yield
    after = {path.name: path.read_bytes() for path in NOTEBOOKS.iterdir()}
    assert sorted(after) == sorted(before), "files appeared in or vanished from notebooks/"
    assert after == before, "a notebook was rewritten by its own run"


def test_the_five_notebooks_exist_with_saved_outputs():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == list(EXPECTED)
    for name in EXPECTED:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in cells), f"{name} has unexecuted cells"
        ignored = [cell for cell in cells if "nbval-ignore-output" in cell.metadata.get("tags", [])
                   or "NBVAL_IGNORE_OUTPUT" in cell.source]
        assert len(ignored) <= 1, f"{name}: most cells must be compared"


def test_saved_outputs_show_gvisor_at_work():
    """The saved outputs are the real runsc-mode ones: gVisor's kernel, green status lines."""
    notebook = nbformat.read(NOTEBOOKS / "01-quickstart.ipynb", as_version=4)
    text = "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "")
                   for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "kernel inside the sandbox: 4.4.0" in text
    assert "[gvisor-magic] runsc (gVisor): exit 0" in text
    stderr = "".join(output.get("text", "") for cell in notebook.cells
                     if cell.cell_type == "code" for output in cell.outputs
                     if output.get("name") == "stderr")
    # Success is quiet: what a cell shows on stderr is its own command's stderr.
    assert "[gvisor-magic]" not in stderr, stderr
    assert "WARNING" not in text and "NOT isolated" not in text
    assert "gvisor-magic: isolated by gVisor (runsc)" in text


def test_notebooks_pass_nbval_with_gvisor(runsc_works, untouched_notebooks):
    check(*run_nbval("runsc", [SANITIZE]))


def test_notebooks_pass_nbval_with_docker(docker_works, untouched_notebooks):
    """The same notebooks under Docker's runsc runtime (notebook 03's small process limits
    included): only the backend's name may differ from the saved runsc outputs."""
    check(*run_nbval("docker", [SANITIZE, SANITIZE_DOCKER]))


def test_notebooks_pass_nbval_in_fallback_mode(untouched_notebooks):
    """A quiet badge with gVisor is a loud WARNING line on the fallback, by design: the
    ``support.nbval_status_shape`` plugin compares the two as one status (where, and how it
    ended)."""
    check(*run_nbval("subprocess", [SANITIZE, SANITIZE_FALLBACK],
                     ("support.nbval_status_shape",)))


def test_nbval_fails_when_an_output_changes(runsc_works, tmp_path):
    """The comparison is real: a saved output edited by one character fails its cell."""
    notebook = nbformat.read(NOTEBOOKS / "04-python-api.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code" and "InvalidRequestError" in cell.source:
            cell.outputs[0]["text"] = cell.outputs[0]["text"].replace("empty", "emptY")
    changed = tmp_path / "04-python-api.ipynb"
    nbformat.write(notebook, changed)
    env = {k: v for k, v in os.environ.items() if k not in GVISOR_ENV}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbval",
         "--nbval-current-env", f"--nbval-sanitize-with={SANITIZE}", "-q", str(changed)],
        cwd=tmp_path, env=dict(env, GVISOR_MAGIC_MODE="runsc"), capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 1, run.stdout[-4000:]
    assert "1 failed" in run.stdout and "emptY" in run.stdout


def test_binder_builds_this_repo_with_its_python(tmp_path):
    """repo2docker's plan for the repo (what mybinder builds): binder/ decides, `.` is installed
    into the kernel's environment after the repository was copied, with binder/runtime.txt's
    Python."""
    repo2docker = Path(sys.executable).parent / "jupyter-repo2docker"
    run = subprocess.run(
        [str(repo2docker), "--no-build", "--debug", "--user-id", "1000", "--user-name",
         "jovyan", str(ROOT)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert runtime.startswith("python-3.")
    assert f"Building conda environment for python={runtime.removeprefix('python-')}" in log
    requirements = [line.strip() for line in (ROOT / "binder" / "requirements.txt").read_text()
                    .splitlines() if line.strip() and not line.startswith("#")]
    assert requirements == [".[agents]"]  # notebooks/05-agents.ipynb drives the MCP server
    install = ('RUN ${KERNEL_PYTHON_PREFIX}/bin/pip install --no-cache-dir '
               '-r "binder/requirements.txt"')
    copy = "COPY --chown=1000:1000 src/ ${REPO_DIR}/"
    assert install in log and copy in log
    assert log.index(copy) < log.index(install), "`.` must be installed after the repo is copied"
    # binder/ wins: no root-level configuration is used alongside it.
    assert "pip install --no-cache-dir ." not in log and "environment.yml" not in log
