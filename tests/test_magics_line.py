"""The ``%isolated`` line magic in IPython's in-process shell, run in gVisor: streamed lines
as its value, the exit code, and options in front of the command."""

from __future__ import annotations

from IPython.utils.text import SList
from support.ipython_shell import RUNSC_OK, SANDBOX_RELEASE, badges, run

from gvisor_magic.notebook.magics import StreamedSList


def test_line_magic_streams_and_returns_lines(ip, capfd, runsc_works):
    run(ip, "files = %isolated printf 'a\\nb\\n'")
    out, err = capfd.readouterr()
    assert (out, err) == ("a\nb\n", "")  # streamed once, not displayed again
    assert badges(ip) == [RUNSC_OK]
    files = ip.user_ns["files"]
    assert isinstance(files, StreamedSList) and isinstance(files, SList)
    assert files == ["a", "b"]
    assert ip.user_ns["_exit_code"] == 0

    value = run(ip, "%isolated uname -r")
    assert value == [SANDBOX_RELEASE]
    out, _ = capfd.readouterr()
    assert out.count(SANDBOX_RELEASE) == 1  # the value did not print itself


def test_line_magic_sets_exit_code_without_raising(ip, capfd, runsc_works):
    assert run(ip, "%isolated exit 4") == []
    assert ip.user_ns["_exit_code"] == 4
    assert badges(ip) == ["[gvisor-magic] runsc (gVisor): exit 4"]


def test_line_magic_takes_options_before_the_command(ip, capfd, runsc_works, docker_works):
    assert run(ip, "%isolated --mode docker --timeout 5 uname -r") == [SANDBOX_RELEASE]
    out, err = capfd.readouterr()  # (a terminal prints an empty "Out[n]:"; a kernel nothing)
    assert out.count(SANDBOX_RELEASE) == 1 and err == ""
    assert badges(ip) == ["[gvisor-magic] docker (gVisor): exit 0"]
    # The command is kept as written: quotes, pipes, redirections and its own dashes.
    value = run(ip, "x = %isolated --quiet --env WHO=gvisor echo \"a  |  $WHO\" | tr a-z A-Z")
    assert value is None and ip.user_ns["x"] == ["A  |  GVISOR"]
    assert capfd.readouterr().out == "A  |  GVISOR\n" and badges(ip) == []
    run(ip, "%isolated --quiet -- echo --mode x")
    assert capfd.readouterr().out.startswith("--mode x\n")
    run(ip, "%isolated --out o --err e sh -c 'echo out; echo err >&2; uname -r'")
    assert capfd.readouterr() == ("", "")
    assert ip.user_ns["o"] == f"out\n{SANDBOX_RELEASE}\n" and ip.user_ns["e"] == "err\n"
    assert badges(ip) == [RUNSC_OK]
    run(ip, "%isolated --timeout 1 sleep 20")
    assert ip.user_ns["_exit_code"] == 124
    assert "timed out in" in capfd.readouterr().err and badges(ip) == []
