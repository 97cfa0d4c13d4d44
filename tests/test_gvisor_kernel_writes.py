"""The "Python 3 (gVisor)" kernel's held writes, cell by cell, checked from the host.

Its working dir is a copy-on-write layer for the kernel's whole life. When a cell ends, what
it changed is judged on the host: a CSV lands in the folder then; a module (which the
host's next ``import`` would run) is held back, listed in that cell, and applied or
discarded only from outside the kernel, with ``gvisor-magic held``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time

import pytest
from test_gvisor_kernel import running

from gvisor_magic.kernel.cells import control_path

GVM = [sys.executable, "-m", "gvisor_magic.cli"]


def execute(kc, code: str, *, answer=None, timeout: float = 120.0) -> tuple[str, dict]:
    """Run ``code``; stdout, and the reply. ``answer(prompt)`` replies to ``input()``."""
    msg_id = kc.execute(code, allow_stdin=answer is not None)
    out = []
    deadline = time.monotonic() + timeout
    idle = False
    while not idle:
        assert time.monotonic() < deadline, f"no end of {code!r}: {''.join(out)!r}"
        if answer is not None:
            try:
                request = kc.get_stdin_msg(timeout=0.05)
            except queue.Empty:
                pass
            else:
                kc.input(answer(request["content"]["prompt"]))
        try:
            msg = kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream":
            out.append(msg["content"]["text"])
        elif kind == "error":
            out.append("\n".join(msg["content"]["traceback"]))
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    reply = kc.get_shell_msg(timeout=timeout)
    return "".join(out), reply["content"]


def held(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GVM, "held", *args], capture_output=True, text=True, timeout=120)


def test_a_cells_files_land_when_it_ends_and_a_module_is_held_until_applied(runsc_works,
                                                                           tmp_path):
    work = tmp_path / "notebook"
    work.mkdir()
    with running(tmp_path, cwd=work) as (km, kc):
        kernel_id = km.kernel_id
        seen_during = []

        def look(prompt: str) -> str:  # the cell waits here, its file written
            seen_during.append(os.path.exists(work / "data.csv"))
            return "go"

        out, reply = execute(kc, "open('data.csv', 'w').write('a,b\\n1,2\\n')\n"
                                 "x = input('wrote? ')\nprint('cell done', x)", answer=look)
        assert reply["status"] == "ok", out
        assert seen_during == [False], "the host's folder changed while the cell ran"
        assert (work / "data.csv").read_text() == "a,b\n1,2\n", out
        assert "held" not in out, out  # an all-inert cell prints nothing about its writes

        out, reply = execute(kc, "open('helpers.py', 'w').write('VALUE = 42\\n')\n"
                                 "open('notes.txt', 'w').write('plain')")
        assert reply["status"] == "ok"
        assert not (work / "helpers.py").exists(), "a module a host import would run landed"
        assert (work / "notes.txt").read_text() == "plain"
        assert "held back" in out and "helpers.py" in out, out
        assert f"gvisor-magic held apply --kernel {kernel_id}" in out, out

        out, _ = execute(kc, "import helpers\nprint(helpers.VALUE)")
        assert out.strip() == "42", "the kernel no longer sees its own held write (or its " \
            f"bytecode was listed): {out}"

        listed = held("list", "--kernel", kernel_id)
        assert listed.returncode == 0, listed.stderr
        assert "helpers.py" in listed.stdout and str(work) in listed.stdout, listed.stdout
        as_json = json.loads(held("list", "--kernel", kernel_id, "--json").stdout)
        assert [c["path"] for c in as_json[0]["held"]] == ["helpers.py"]

        applied = held("apply", "--kernel", kernel_id, "helpers.py")
        assert applied.returncode == 0, applied.stderr
        assert "applied helpers.py" in applied.stdout, applied.stdout
        assert (work / "helpers.py").read_text() == "VALUE = 42\n"

        # Written again by a later cell: held again, and discarding it leaves the host's.
        out, _ = execute(kc, "open('helpers.py', 'w').write('VALUE = 43\\n')\n"
                             "open('other.py', 'w').write('')")
        assert "helpers.py" in out and "other.py" in out, out
        discarded = held("discard", "--kernel", kernel_id)
        assert discarded.returncode == 0, discarded.stderr
        assert "discarded helpers.py" in discarded.stdout, discarded.stdout
        assert (work / "helpers.py").read_text() == "VALUE = 42\n"
        assert not (work / "other.py").exists()
        assert "0 change(s) held" in held("list", "--kernel", kernel_id).stdout

        # A file removed by a cell is removed from the folder when the cell ends.
        out, _ = execute(kc, "import os\nos.remove('notes.txt')")
        assert not (work / "notes.txt").exists(), out
        socket_path = control_path(kernel_id)
        assert os.path.exists(socket_path)
    assert not os.path.exists(socket_path), "the kernel's held-writes socket outlived it"
    assert held("list", "--kernel", kernel_id).returncode == 1


def test_nothing_a_cell_runs_can_apply_what_it_wrote(runsc_works, tmp_path):
    """The ``held`` socket is outside the sandbox: a cell cannot reach it, and asking the
    command from inside the kernel finds no kernel to apply for."""
    work = tmp_path / "notebook"
    work.mkdir()
    with running(tmp_path, cwd=work) as (km, kc):
        out, _ = execute(kc, "open('sitecustomize.py', 'w').write('print(1)')")
        assert "sitecustomize.py" in out, out
        out, _ = execute(kc, f"import os\nprint(os.path.exists({control_path(km.kernel_id)!r}))\n"
                             "!gvisor-magic held apply --all; echo status=$?")
        assert out.splitlines()[0] == "False", out
        assert not (work / "sitecustomize.py").exists(), out


@pytest.mark.parametrize("writes", ["direct", "review"])
def test_the_kernelspec_chooses_the_writes(runsc_works, tmp_path, writes):
    work = tmp_path / "notebook"
    work.mkdir()
    with running(tmp_path, config={"writes": writes}, cwd=work) as (_km, kc):
        out, _ = execute(kc, "open('data.csv', 'w').write('x')")
        if writes == "direct":
            assert (work / "data.csv").read_text() == "x" and "held" not in out, out
        else:
            assert not (work / "data.csv").exists()
            assert "held for review" in out and "data.csv" in out, out
