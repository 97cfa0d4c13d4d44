"""The ``%%isolated`` cell magic in IPython's in-process shell, run in gVisor: its output,
exit status, options and variable expansion (its usage errors: tests/test_magics_usage.py)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from support.ipython_shell import RUNSC_OK, SANDBOX_RELEASE, badges, run

from gvisor_magic import CommandResult


def test_cell_runs_in_gvisor_and_says_so(ip, capfd, runsc_works):
    run(ip, "%%isolated\nuname -r\n")
    out, err = capfd.readouterr()
    assert out == f"{SANDBOX_RELEASE}\n"
    # Success is said quietly: a badge (display_data), nothing on stderr (painted red).
    assert err == ""
    [output] = ip.display_pub.outputs
    assert output["data"]["text/plain"] == RUNSC_OK  # stable: no timings
    assert re.search(r"runsc \(gVisor\): exit 0 in \d+\.\d\ds", output["data"]["text/html"])
    assert "<svg" in output["data"]["text/html"]  # an icon that needs no emoji font
    assert ip.user_ns["_exit_code"] == 0


def test_nonzero_exit_raises_called_process_error(ip, capfd, runsc_works):
    with pytest.raises(subprocess.CalledProcessError) as caught:
        run(ip, "%%isolated\necho partial\necho oops >&2\nexit 3\n")
    assert caught.value.returncode == 3
    assert caught.value.cmd == "echo partial\necho oops >&2\nexit 3\n"
    assert (caught.value.output, caught.value.stderr) == ("partial\n", "oops\n")
    assert ip.user_ns["_exit_code"] == 3
    out, err = capfd.readouterr()
    assert out.startswith("partial\n")  # streamed before the traceback
    assert err == "oops\n"  # the command's own stderr; the traceback says it failed
    assert badges(ip) == ["[gvisor-magic] runsc (gVisor): exit 3"]


def test_no_raise_error(ip, capfd, runsc_works):
    assert run(ip, "%%isolated --no-raise-error\necho before\nexit 3\n") is None
    assert ip.user_ns["_exit_code"] == 3
    out, err = capfd.readouterr()
    assert (out, err) == ("before\n", "")
    assert badges(ip) == ["[gvisor-magic] runsc (gVisor): exit 3"]


def test_out_err_result_capture_instead_of_printing(ip, capfd, runsc_works):
    run(ip, "%%isolated --out o --err e --result r\necho to-out\necho to-err >&2\nuname -r\n")
    out, err = capfd.readouterr()
    assert out == ""
    assert err == "" and badges(ip) == [RUNSC_OK]
    assert ip.user_ns["o"] == f"to-out\n{SANDBOX_RELEASE}\n"
    assert ip.user_ns["e"] == "to-err\n"
    result = ip.user_ns["r"]
    assert isinstance(result, CommandResult)
    assert (result.backend, result.isolated, result.returncode) == ("runsc", True, 0)
    assert result.stdout == ip.user_ns["o"] and result.stderr == "to-err\n"

    # --out alone: stderr still streams; --quiet: no status line
    run(ip, "%%isolated --out only --quiet\necho kept\necho shown >&2\n")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "shown\n")
    assert ip.user_ns["only"] == "kept\n"


def test_out_is_set_even_when_the_command_fails(ip, capfd, runsc_works):
    with pytest.raises(subprocess.CalledProcessError):
        run(ip, "%%isolated --out o --quiet\necho got-this\nexit 1\n")
    assert ip.user_ns["o"] == "got-this\n"
    assert "got-this" not in capfd.readouterr().out.splitlines()  # only the traceback


def test_variables_expand_in_body_and_options(ip, capfd, runsc_works):
    ip.user_ns["greeting"] = "hello world"
    ip.user_ns["who"] = "gvisor"
    # body: $var and {expr} from user_ns; $$ is a literal $ for the shell
    # line: expanded by IPython, here into --env values
    run(ip, '%%isolated --quiet --env NAME=$who --env N={3*4}\n'
            'echo "$greeting" {6*7} "$$NAME" "$$N"\n')
    assert capfd.readouterr().out == "hello world 42 gvisor 12\n"


def test_every_line_of_the_body_expands(ip, capfd, tmp_path, runsc_works):
    ip.user_ns["name"] = "data"
    ip.user_ns["greeting"] = "hello world"
    # Each line is all or nothing (like one !cmd line): shell braces that are not
    # Python leave their line alone without stopping the other lines.
    run(ip, "%%isolated --quiet\n"
            "pwd > before.txt\n"
            "echo $name > $name-file\n"
            "echo x{a,b} {6*7}\n"
            "echo '$greeting' \"$greeting\"\n"
            "echo last\n")
    assert capfd.readouterr().out == "xa xb {6*7}\n$greeting hello world\nlast\n"
    assert (tmp_path / "before.txt").read_text() == f"{tmp_path}\n"
    assert (tmp_path / "data-file").read_text() == "data\n"


def test_timeout_option(ip, capfd, runsc_works):
    run(ip, "%%isolated --timeout 1 --no-raise-error\necho begun\nsleep 30\n")
    assert ip.user_ns["_exit_code"] == 124
    out, err = capfd.readouterr()
    assert out == "begun\n"
    assert re.search(r"^\[gvisor-magic\] runsc \(gVisor\): timed out in \d+\.\d\ds$", err, re.M)


def test_workdir_and_repo_options(ip, capfd, tmp_path, runsc_works):
    work = tmp_path / "work"
    repo = tmp_path / "repo"
    work.mkdir()
    repo.mkdir()
    (repo / "source.txt").write_text("from the repo\n")
    ip.user_ns["repo_dir"] = str(repo)
    run(ip, f"%%isolated --quiet --no-raise-error --workdir {work} --repo {repo}\n"
            "pwd\ncat $repo_dir/source.txt > copy.txt\n"
            "touch $repo_dir/new 2>/dev/null && echo wrote || echo read-only\n")
    assert capfd.readouterr().out == f"{work}\nread-only\n"
    assert (work / "copy.txt").read_text() == "from the repo\n"
    assert sorted(os.listdir(repo)) == ["source.txt"]
