"""The extension in a real ipykernel, driven over ZeroMQ with jupyter_client."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
from support.kernel_helpers import Execution, Kernel, start_kernel, stop_kernel

SANDBOX_RELEASE = "4.4.0"
HOST_RELEASE = os.uname().release
RUNSC_OK = "[gvisor-magic] runsc (gVisor): exit 0"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _ok(execution: Execution) -> Execution:
    assert execution.errors == [] and execution.reply["status"] == "ok", execution.describe()
    return execution


@pytest.fixture(scope="module")
def kernel(runsc_works, tmp_path_factory):
    """One kernel for the tests that do not disturb it, with the extension loaded."""
    kernel = start_kernel(str(tmp_path_factory.mktemp("kernel-cwd")))
    try:
        _ok(kernel.execute("%load_ext gvisor_magic"))
        yield kernel
    finally:
        stop_kernel(kernel)


@pytest.fixture
def fresh_kernel(runsc_works, tmp_path):
    kernel = start_kernel(str(tmp_path))
    try:
        _ok(kernel.execute("%load_ext gvisor_magic"))
        yield kernel
    finally:
        stop_kernel(kernel)


def runsc_descendants(kernel: Kernel) -> list[str]:
    found = []
    for process in kernel.descendants():
        try:
            cmdline = " ".join(process.cmdline())
            name = process.name()
        except Exception:  # exited meanwhile
            continue
        if "runsc" in name or "runsc" in cmdline:
            found.append(f"{process.pid}: {cmdline}")
    return found


def test_output_streams_live_into_the_cell(kernel):
    go = Path(kernel.cwd, "go")
    go.unlink(missing_ok=True)
    released: dict[str, float] = {}

    def on_message(execution: Execution, msg: dict) -> None:
        if "at" not in released and "first" in execution.stdout:
            # Only now may the command go on: "second" cannot have been printed yet.
            assert "second" not in execution.stdout
            released["at"] = time.monotonic()
            go.touch()

    execution = _ok(kernel.execute(
        "%%isolated\n"
        "echo first\n"
        "for i in $(seq 300); do [ -e go ] && break; sleep 0.1; done\n"
        "[ -e go ] && echo second || echo gave-up\n",
        timeout=60, on_message=on_message))
    assert execution.stdout == "first\nsecond\n"
    assert execution.first_arrival("stdout", "second") > released["at"]
    assert execution.stderr == "" and execution.badges() == [RUNSC_OK]

    execution = _ok(kernel.execute("%%isolated\nuname -r\n"))
    assert execution.stdout == f"{SANDBOX_RELEASE}\n"
    assert execution.stderr == "" and execution.badges() == [RUNSC_OK]


def test_errors_and_exit_codes(kernel):
    execution = kernel.execute("%%isolated\necho partial\nexit 3\n")
    assert execution.reply["status"] == "error"
    [(ename, evalue)] = execution.errors
    assert ename == "CalledProcessError"
    assert evalue == "Command 'echo partial\nexit 3\n' returned non-zero exit status 3."
    assert execution.stdout == "partial\n"

    execution = _ok(kernel.execute("%%isolated --no-raise-error\nexit 3\n"))
    assert execution.badges() == ["[gvisor-magic] runsc (gVisor): exit 3"]
    assert _ok(kernel.execute("print(_exit_code)")).stdout == "3\n"


def test_interrupt_kills_the_sandbox_and_keeps_the_kernel(fresh_kernel):
    kernel = fresh_kernel
    sent: dict[str, float] = {}

    def on_message(execution: Execution, msg: dict) -> None:
        if "at" not in sent and "start" in execution.stdout:
            sent["at"] = time.monotonic()
            kernel.km.interrupt_kernel()

    execution = kernel.execute("%%isolated\necho start; trap '' INT; sleep 1000\n",
                               timeout=60, on_message=on_message)
    assert "at" in sent, execution.describe()
    assert execution.finished - sent["at"] < 5.0, execution.describe()
    assert execution.stdout == "start\n"
    assert execution.reply["status"] == "error"
    [(ename, _)] = execution.errors
    assert ename in ("KeyboardInterrupt", "CommandInterrupted")
    assert "(interrupted)" in execution.stderr
    # The kernel keeps its one warm sandbox; the interrupted tree inside it is gone.
    assert len([p for p in runsc_descendants(kernel) if " run " in p]) == 1
    inside = _ok(kernel.execute("%%isolated\nps -e -o comm=\n"))
    assert "sleep" not in inside.stdout, inside.stdout

    execution = _ok(kernel.execute("%%isolated\necho ok\n"))
    assert execution.stdout == "ok\n"
    assert execution.badges() == [RUNSC_OK]


def test_bang_routing_in_the_kernel(kernel):
    execution = _ok(kernel.execute("%isolation on"))
    assert execution.stderr == "" and execution.stdout.startswith("[gvisor-magic] routing on.")
    assert "In the sandbox: !cmd, !!cmd, x = !cmd, %sx" in execution.stdout

    execution = _ok(kernel.execute("!uname -r"))
    assert execution.stdout == f"{SANDBOX_RELEASE}\n"
    assert execution.stderr == "" and execution.badges() == [RUNSC_OK]

    # IPython's script cells go to the sandbox too, and keep their options.
    for cell in ("%%bash\nuname -r\n", "%%sh\nuname -r\n", "%%script bash\nuname -r\n",
                 "%%python3\nimport os; print(os.uname().release)\n"):
        execution = _ok(kernel.execute(cell))
        assert execution.stdout == f"{SANDBOX_RELEASE}\n", execution.describe()
        assert execution.badges() == [RUNSC_OK]
    _ok(kernel.execute("%%bash --out captured\nuname -r\n"))
    assert _ok(kernel.execute("print(captured)")).stdout == f"{SANDBOX_RELEASE}\n\n"
    refused = kernel.execute("%%bash --bg\nsleep 1\n")
    assert refused.reply["status"] == "error" and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("UsageError: %%bash --bg: a background process")

    execution = _ok(kernel.execute("lines = !uname -r\nprint(lines)"))
    assert execution.stdout == f"['{SANDBOX_RELEASE}']\n"

    execution = _ok(kernel.execute("%pip --version"))
    assert re.search(r"^pip \S+ from " + re.escape(sys.prefix) + "/", execution.stdout, re.M), \
        execution.describe()
    assert "[gvisor-magic]" not in execution.stdout + execution.stderr

    # %isolated streams its lines and its value does not show itself again
    execution = _ok(kernel.execute("%isolated echo hi"))
    assert (execution.stdout, execution.results) == ("hi\n", [])

    execution = _ok(kernel.execute("%isolation off"))
    assert "run on the host again" in execution.stdout and execution.stderr == ""
    execution = _ok(kernel.execute("!uname -r"))
    assert execution.stdout.replace("\r\n", "\n") == f"{HOST_RELEASE}\n"
    assert "[gvisor-magic]" not in execution.stderr
    execution = _ok(kernel.execute("%%bash\nuname -r\n"))
    assert execution.stdout == f"{HOST_RELEASE}\n" and execution.badges() == []
    execution = _ok(kernel.execute(
        "ip = get_ipython()\n"
        "print('system' in ip.__dict__, 'getoutput' in ip.__dict__,"
        " ip.system.__func__ is type(ip).system)"))
    assert execution.stdout == "False False True\n"


def test_status_widget_in_the_kernel(kernel):
    _ok(kernel.execute("%%isolated --quiet --no-raise-error\nexit 4\n"))
    execution = _ok(kernel.execute(
        "import gvisor_magic\nw = gvisor_magic.status_widget()\nw"))
    [data] = execution.results
    assert data["text/plain"] == ("gvisor-magic: isolated by gVisor (runsc) | network off"
                                  " | last: exit 4")
    model_id = data[WIDGET_VIEW]["model_id"]

    execution = _ok(kernel.execute("%%isolated --quiet\ntrue\n"))
    updates = [msg["data"]["state"]["value"] for msg in execution.comm_msgs
               if msg["comm_id"] == model_id and msg["data"].get("method") == "update"
               and "value" in msg["data"].get("state", {})]
    assert updates, execution.describe()
    assert "border-left:6px solid #1a7f37" in updates[-1]
    assert re.search(r"<td>runsc: exit 0 in \d+\.\d\ds</td>", updates[-1])

    execution = _ok(kernel.execute("print(repr(w))"))
    assert execution.stdout == ("gvisor-magic: isolated by gVisor (runsc) | network off"
                                " | last: exit 0\n")

    # One cell on the host leaves the kernel's default (and the panel's colour) alone.
    _ok(kernel.execute("%%isolated --quiet --mode subprocess\ntrue\n"))
    execution = _ok(kernel.execute("print(repr(w))"))
    assert execution.stdout == ("gvisor-magic: isolated by gVisor (runsc) | network off"
                                " | last: subprocess, NOT isolated: exit 0\n")


def test_line_magic_options_and_usage_errors_in_the_kernel(kernel):
    execution = _ok(kernel.execute("%isolated --timeout 5 uname -r"))
    assert (execution.stdout, execution.results) == (f"{SANDBOX_RELEASE}\n", [])
    assert execution.badges() == [RUNSC_OK]
    execution = _ok(kernel.execute("x = %isolated --quiet ls /\nprint('usr' in x)"))
    assert execution.stdout.endswith("True\n") and execution.displays == []
    # Bad arguments: one UsageError line, as IPython's own magics give, and nothing runs.
    for cell, message in (("%%isolated --env X\ntouch ran\n", "--env expects KEY=VALUE"),
                          ("%isolated --limit foo touch ran", "--limit expects NAME=VALUE"),
                          ("%isolation frob", "unknown %isolation verb 'frob'")):
        execution = kernel.execute(cell)
        assert execution.reply["status"] == "error", execution.describe()
        assert execution.stderr.startswith(f"UsageError: {message}"), execution.describe()
        assert execution.stderr.count("\n") == 1 and "Traceback" not in execution.stderr
    assert not Path(kernel.cwd, "ran").exists()


def test_a_fallback_cell_is_loud_in_the_kernel(kernel):
    execution = _ok(kernel.execute("%%isolated --mode subprocess\nuname -r\n"))
    assert execution.stdout == f"{HOST_RELEASE}\n" and execution.badges() == []
    assert execution.stderr.startswith("[gvisor-magic] WARNING: subprocess (NOT isolated)")


PLANT_CELL = ("echo 'print(\"PLANTED-IN-KERNEL\")' > colorsys.py\n"
              "echo 'print(\"PLANTED-AT-START\")' > sitecustomize.py\n"
              "echo kept > data.txt\n")


def test_a_planted_module_is_held_off_the_host_and_the_cell_lists_it(fresh_kernel, tmp_path):
    """IPython puts the kernel's directory first on sys.path: a ``colorsys.py`` that a cell
    writes there would be what the kernel's next ``import colorsys`` runs, on the host. With
    held writes (the default) it never reaches the host: the cell shows what it held and how
    to apply it, and ordinary files land."""
    cell = _ok(fresh_kernel.execute("%%isolated --quiet\n" + PLANT_CELL))
    review = [d["text/plain"] for d in cell.displays if "held for review" in d["text/plain"]]
    assert len(review) == 1, cell.describe()
    assert "+ colorsys.py" in review[0] and "+ sitecustomize.py" in review[0], review
    assert "%isolation apply PATH" in review[0]
    assert (tmp_path / "data.txt").read_text() == "kept\n"
    assert not (tmp_path / "colorsys.py").exists()
    assert not (tmp_path / "sitecustomize.py").exists()
    imported = _ok(fresh_kernel.execute("import colorsys; print(colorsys.__file__)"))
    assert "PLANTED" not in imported.stdout + imported.stderr
    discarded = _ok(fresh_kernel.execute("%isolation discard"))
    assert "discarded colorsys.py" in discarded.stdout, discarded.describe()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_a_planted_module_never_reaches_the_kernel_and_the_cell_says_why(fresh_kernel, tmp_path):
    """With writes landing directly (``--writes direct``): a ``colorsys.py`` a cell writes
    into the kernel's directory is quarantined when the cell ends, the cell warns (even with
    --quiet), and ordinary files stay."""
    quarantine = tmp_path.parent / f"{tmp_path.name}-quarantine"
    _ok(fresh_kernel.execute(f"import os; os.environ['GVISOR_MAGIC_QUARANTINE_DIR'] = "
                             f"{str(quarantine)!r}"))
    cell = _ok(fresh_kernel.execute(
        "%%isolated --quiet --writes direct\n"
        "echo 'print(\"PLANTED-IN-KERNEL\")' > colorsys.py\n"
        "echo 'print(\"PLANTED-AT-START\")' > sitecustomize.py\n"
        "echo kept > data.txt\n"))
    assert "WARNING" in cell.stderr and "quarantine" in cell.stderr, cell.describe()
    assert "colorsys.py" in cell.stderr and "shadows 'import colorsys'" in cell.stderr
    assert "sitecustomize.py" in cell.stderr
    assert (tmp_path / "data.txt").read_text() == "kept\n"
    assert not (tmp_path / "colorsys.py").exists()
    imported = _ok(fresh_kernel.execute("import colorsys; print(colorsys.__file__)"))
    assert "PLANTED" not in imported.stdout + imported.stderr
    assert imported.stdout.strip().startswith(sys.base_prefix) or "/usr/" in imported.stdout
    kept = sorted(p.name for p in quarantine.rglob("*") if p.is_file())
    assert kept == ["colorsys.py", "sitecustomize.py"], kept
