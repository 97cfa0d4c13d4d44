"""The IPython extension in IPython's in-process shell: %%isolated, %isolated, %isolation."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
from IPython import get_ipython
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.error import UsageError
from IPython.core.history import HistoryManager
from IPython.testing.globalipapp import start_ipython
from IPython.utils.text import SList

import gvisor_magic
from gvisor_magic import CommandResult, IsolationUnavailable
from gvisor_magic.notebook.magics import StreamedSList
from gvisor_magic.runner import REGISTRY

SANDBOX_RELEASE = "4.4.0"
HOST_RELEASE = os.uname().release
GREEN, AMBER, RED = "#1a7f37", "#b26b00", "#cf222e"
RUNSC_OK = "[gvisor-magic] runsc (gVisor): exit 0"
STATUS = re.compile(r"^\[gvisor-magic\] .*$", re.M)
OPTIONS = ("--mode", "--timeout", "--workdir", "--repo", "--env", "--network", "--allow-host",
           "--require-isolation", "--out", "--err", "--result", "--no-raise-error", "--quiet")


@pytest.fixture(scope="module")
def shell():
    shell = start_ipython() or get_ipython()  # None when someone else started it first
    # globalipapp binds a doctest-friendly `system` on the instance: take it away here so
    # `!cmd` behaves as in a real shell (and routing can be checked exactly), then put it back.
    previous = {name: shell.__dict__.pop(name) for name in ("system", "getoutput")
                if name in shell.__dict__}
    _history_in_memory(shell)
    yield shell
    shell.__dict__.update(previous)


def _history_in_memory(shell) -> None:
    """globalipapp keeps history in a file under the session's temporary directory, which
    conftest removes before IPython's atexit hook writes to it (a noisy sqlite error)."""
    old = shell.history_manager
    if old is None or str(old.hist_file) == ":memory:":
        return
    old.end_session()
    old.close()
    shell.history_manager = HistoryManager(shell=shell, parent=shell, hist_file=":memory:")
    if old in shell.configurables:
        shell.configurables[shell.configurables.index(old)] = shell.history_manager


@pytest.fixture
def ip(shell, monkeypatch, tmp_path, capfd):
    """The shell with the extension loaded in a scratch cwd; everything undone afterwards."""
    monkeypatch.chdir(tmp_path)  # %%isolated mounts the cwd read-write
    saved_ns = dict(shell.user_ns)
    shell.config.pop("Isolation", None)
    shell.run_line_magic("load_ext", "gvisor_magic")
    capfd.readouterr()
    # Rich displays (the status badge) are recorded apart from the streams, as a
    # notebook keeps a display_data output apart from stdout and stderr.
    terminal_publisher, shell.display_pub = shell.display_pub, CapturingDisplayPublisher()
    yield shell
    shell.display_pub = terminal_publisher
    shell.run_line_magic("unload_ext", "gvisor_magic")
    shell.config.pop("Isolation", None)
    for name in set(shell.user_ns) - set(saved_ns):
        del shell.user_ns[name]
    shell.user_ns.update(saved_ns)
    assert "system" not in shell.__dict__ and "getoutput" not in shell.__dict__


def magics(shell):
    return shell.magics_manager.registry["IsolatedMagics"]


def run(shell, code: str):
    """Run a cell; return its result, or raise what it raised."""
    result = shell.run_cell(code)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result


def status_lines(err: str) -> list[str]:
    return STATUS.findall(err)


def badges(shell) -> list[str]:
    """The ``text/plain`` of every status badge displayed since the last call."""
    outputs = shell.display_pub.outputs
    found = [output["data"]["text/plain"] for output in outputs
             if "gvisor-magic-badge" in output["data"].get("text/html", "")]
    outputs.clear()
    return found


# -- %%isolated ------------------------------------------------------------------------


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


def test_subprocess_mode_runs_on_the_host_and_warns(ip, capfd):
    run(ip, "%%isolated --mode subprocess\nuname -r\n")
    out, err = capfd.readouterr()
    assert out == f"{HOST_RELEASE}\n"
    [line] = status_lines(err)
    assert line.startswith("[gvisor-magic] WARNING: subprocess (NOT isolated): exit 0 in ")
    assert "fallback: mode 'subprocess' was requested: gVisor was not used" in line


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


BAD_ARGUMENTS = [
    ("%%isolated --env JUSTKEY\ntouch ran\n", "--env expects KEY=VALUE, got 'JUSTKEY'"),
    ("%%isolated --limit foo\ntouch ran\n", "--limit expects NAME=VALUE, got 'foo'"),
    ("%%isolated --limit memory=lots\ntouch ran\n", "limits.memory: cannot read 'lots'"),
    ("%%isolated --limit memroy=1G\ntouch ran\n", "unknown limit 'memroy'"),
    ("%%isolated --mode gvisor\ntouch ran\n", "argument --mode: invalid choice: 'gvisor'"),
    ("%%isolated --timeout 0\ntouch ran\n", "--timeout must be > 0 seconds"),
    ("%%isolated --workdir /no/such/dir\ntouch ran\n", "--workdir: '/no/such/dir' is not a dir"),
    ("%%isolated --out 2x\ntouch ran\n", "--out expects a variable name, got '2x'"),
    ("%%isolated --frobnicate\ntouch ran\n", "unrecognized arguments: --frobnicate"),
    ("%isolated --env X touch ran", "--env expects KEY=VALUE, got 'X'"),
    ("%isolated --timeout soon touch ran", "argument --timeout: invalid float value: 'soon'"),
    ("%isolation maybe", "unknown %isolation verb 'maybe': use %isolation on|off|status|restart"),
    ("%isolation on please", "%isolation on takes no arguments"),
]


@pytest.mark.parametrize("cell, message", BAD_ARGUMENTS, ids=[c for c, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_usage_errors_and_nothing_runs(ip, capfd, tmp_path, cell, message):
    """As IPython's own magics do: UsageError, shown as one line without a traceback."""
    with pytest.raises(UsageError) as caught:
        run(ip, cell)
    assert message in str(caught.value)
    out, err = capfd.readouterr()
    assert err.strip() == f"UsageError: {caught.value}" and "Traceback" not in out + err
    assert not (tmp_path / "ran").exists() and ip.display_pub.outputs == []


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


def test_cell_help_lists_every_option(ip, capfd):
    run(ip, "%%isolated?")
    out = capfd.readouterr().out
    assert "Run the cell as a shell script in a gVisor sandbox." in out
    for option in OPTIONS:
        assert option in out, option


# -- %isolated ---------------------------------------------------------------------------


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


def test_line_magic_needs_a_command(ip):
    for line in ("%isolated   ", "%isolated --timeout 5", "%isolated --quiet --"):
        with pytest.raises(UsageError, match="%isolated needs a command"):
            run(ip, line)


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


def test_split_options_reads_only_the_front_of_the_line():
    from gvisor_magic.notebook.magics import split_options

    assert split_options("--mode docker --timeout 5 ls -l | wc") == (
        ["--mode", "docker", "--timeout", "5"], "ls -l | wc")
    assert split_options("--quiet -- --help") == (["--quiet"], "--help")
    assert split_options("echo 'it''s' \"$HOME\" --mode x") == (
        [], "echo 'it''s' \"$HOME\" --mode x")
    assert split_options("--env 'A=b c' echo \"unbalanced") == (["--env", "A=b c"],
                                                                "echo \"unbalanced")
    assert split_options("--limit=memory=1G true") == (["--limit=memory=1G"], "true")
    assert split_options("  --quiet  ") == (["--quiet"], "")


# -- the quiet badge and the loud line -------------------------------------------------------


def test_what_needs_attention_is_loud_on_stderr(ip, capfd, tmp_path, monkeypatch, runsc_works):
    monkeypatch.setenv("GVISOR_MAGIC_QUARANTINE_DIR", str(tmp_path / "quarantine"))
    run(ip, "%%isolated --mode subprocess\ntrue\n")
    [line] = status_lines(capfd.readouterr().err)
    assert line.startswith("[gvisor-magic] WARNING: subprocess (NOT isolated): exit 0")
    run(ip, "%%isolated --timeout 1 --no-raise-error\nsleep 20\n")
    [line] = status_lines(capfd.readouterr().err)
    assert re.fullmatch(r"\[gvisor-magic\] runsc \(gVisor\): timed out in \d+\.\d\ds", line)
    run(ip, "%%isolated\necho 'print(1)' > sitecustomize.py\n")
    err = capfd.readouterr().err
    assert "[gvisor-magic] runsc (gVisor): exit 0 in" in err and badges(ip) == []
    assert "WARNING: the command left files" in err and "sitecustomize.py" in err, err
    # --quiet drops the status line, never a warning.
    run(ip, "%%isolated --quiet\necho 'print(1)' > colorsys.py\n")
    err = capfd.readouterr().err
    assert "quarantine" in err and "colorsys.py" in err and "(gVisor): exit" not in err


def test_config_quiet_silences_the_badge(ip, capfd, runsc_works):
    run(ip, "%config Isolation.quiet = True")
    run(ip, "%%isolated\nuname -r\n")
    assert capfd.readouterr() == (f"{SANDBOX_RELEASE}\n", "") and badges(ip) == []


# -- %isolation on/off: routing ! through the sandbox ---------------------------------


def _pip_entry(shell):
    return shell.magics_manager.magics["line"]["pip"]


def test_routing_sends_bang_commands_to_the_sandbox(ip, capfd, runsc_works):
    run(ip, "%isolation on")
    said, err = capfd.readouterr()
    assert err == "" and said.startswith("[gvisor-magic] routing on.\n")
    assert "In the sandbox: !cmd, !!cmd, x = !cmd, %sx, and the script cells %%bash" in said
    assert "%%script PROGRAM" in said and "Python\n                  code itself" in said

    run(ip, "y = !uname -r")
    assert ip.user_ns["y"] == [SANDBOX_RELEASE] and isinstance(ip.user_ns["y"], SList)
    assert capfd.readouterr().err == "" and badges(ip) == [RUNSC_OK]

    assert run(ip, "!!uname -r") == [SANDBOX_RELEASE]
    assert run(ip, "%sx uname -r") == [SANDBOX_RELEASE]

    run(ip, "!uname -r")
    assert capfd.readouterr().out.endswith(f"{SANDBOX_RELEASE}\n")

    ip.user_ns["word"] = "expanded"
    run(ip, "!echo $word {1+1}")
    assert capfd.readouterr().out == "expanded 2\n"

    run(ip, "!exit 5")
    assert ip.user_ns["_exit_code"] == 5
    assert badges(ip)[-1] == "[gvisor-magic] runsc (gVisor): exit 5"


def test_pip_stays_on_the_host_while_routing_is_on(ip, capfd, runsc_works):
    run(ip, "%isolation on")
    capfd.readouterr()
    run(ip, "%pip --version")
    out, err = capfd.readouterr()
    assert re.search(r"^pip \S+ from " + re.escape(sys.prefix) + r"/", out, re.M), out
    assert "[gvisor-magic]" not in out + err  # not a sandboxed run
    # and routing is still on for everything else
    assert run(ip, "!!uname -r") == [SANDBOX_RELEASE]
    assert getattr(_pip_entry(ip), "__wrapped__", None) is not None


def test_isolation_off_restores_system_exactly(ip, capfd, runsc_works):
    shell_type = type(ip)
    run(ip, "%isolation on")
    assert "system" in ip.__dict__ and "getoutput" in ip.__dict__
    run(ip, "%isolation off")
    assert "run on the host again" in capfd.readouterr().out
    assert "system" not in ip.__dict__ and "getoutput" not in ip.__dict__
    assert ip.system.__func__ is shell_type.system
    assert ip.getoutput.__func__ is shell_type.getoutput
    assert getattr(_pip_entry(ip), "__wrapped__", None) is None
    assert run(ip, "!!uname -r") == [HOST_RELEASE]
    capfd.readouterr()
    run(ip, "%pip --version")
    out, err = capfd.readouterr()
    assert out.startswith("pip ") and "[gvisor-magic]" not in err


SCRIPT_CELLS = ("bash", "sh", "script", "python3")


@pytest.mark.parametrize("cell, out", [
    ("%%bash\nuname -r\necho \"$0\"\n", f"{SANDBOX_RELEASE}\nbash\n"),
    ("%%sh\nuname -r\n", f"{SANDBOX_RELEASE}\n"),
    ("%%script bash --norc\nuname -r\n", f"{SANDBOX_RELEASE}\n"),
    ("%%script sh\nuname -r\n", f"{SANDBOX_RELEASE}\n"),
    ("%%python3\nimport os\nprint(os.uname().release)\n", f"{SANDBOX_RELEASE}\n"),
], ids=["bash", "sh", "script-bash", "script-sh", "python3"])
def test_routing_sends_script_cells_to_the_sandbox(ip, capfd, runsc_works, cell, out):
    run(ip, "%isolation on")
    capfd.readouterr()
    run(ip, cell)
    assert capfd.readouterr() == (out, "") and badges(ip) == [RUNSC_OK]
    run(ip, "%isolation off")
    capfd.readouterr()
    run(ip, cell)  # on the host again, by IPython's own magic
    assert SANDBOX_RELEASE not in capfd.readouterr().out and badges(ip) == []


def test_routed_script_cells_keep_their_options(ip, capfd, tmp_path, runsc_works):
    run(ip, "%isolation on")
    capfd.readouterr()
    run(ip, "%%bash --out o --err e\necho out; echo err >&2; uname -r\n")
    assert capfd.readouterr() == ("", "")
    assert (ip.user_ns["o"], ip.user_ns["e"]) == (f"out\n{SANDBOX_RELEASE}\n", "err\n")
    with pytest.raises(subprocess.CalledProcessError) as caught:
        run(ip, "%%bash\necho partial\nexit 3\n")
    assert caught.value.returncode == 3 and ip.user_ns["_exit_code"] == 3
    run(ip, "%%bash --no-raise-error\nexit 4\n")
    assert ip.user_ns["_exit_code"] == 4
    assert badges(ip)[-1] == "[gvisor-magic] runsc (gVisor): exit 4"
    capfd.readouterr()
    for cell in ("%%bash --bg\ntouch ran\n", "%%script --proc p bash\ntouch ran\n"):
        with pytest.raises(UsageError, match="cannot be handed back from the sandbox"):
            run(ip, cell)
    with pytest.raises(UsageError, match="%%script needs a program"):
        run(ip, "%%script\ntouch ran\n")
    assert not (tmp_path / "ran").exists()


def test_unload_restores_system_and_the_magics_tables(ip, capfd, runsc_works):
    shell_type = type(ip)
    settings = magics(ip).settings
    run(ip, "%isolation on")
    run(ip, "%unload_ext gvisor_magic")
    assert "system" not in ip.__dict__ and "getoutput" not in ip.__dict__
    assert ip.system.__func__ is shell_type.system
    assert ip.getoutput.__func__ is shell_type.getoutput
    assert getattr(_pip_entry(ip), "__wrapped__", None) is None
    assert "isolated" not in ip.magics_manager.magics["cell"]
    for name in SCRIPT_CELLS:
        assert getattr(ip.magics_manager.magics["cell"][name], "__wrapped__", None) is None
    assert "isolated" not in ip.magics_manager.magics["line"]
    assert "isolation" not in ip.magics_manager.magics["line"]
    assert "IsolatedMagics" not in ip.magics_manager.registry
    assert settings not in ip.configurables
    assert run(ip, "!!uname -r") == [HOST_RELEASE]
    capfd.readouterr()
    run(ip, "%pip --version")
    assert capfd.readouterr().out.startswith("pip ")
    run(ip, "%load_ext gvisor_magic")  # for the fixture, and: loading again works
    run(ip, "%%isolated --quiet\nuname -r\n")
    assert capfd.readouterr().out.endswith(f"{SANDBOX_RELEASE}\n")


def test_routing_keeps_and_restores_an_earlier_instance_override(ip, capfd, runsc_works):
    calls = []

    def earlier_system(self, cmd):
        calls.append(cmd)

    earlier = ip.system = types.MethodType(earlier_system, ip)
    try:
        run(ip, "%isolation on")
        capfd.readouterr()
        run(ip, "!uname -r")
        assert calls == [] and capfd.readouterr().out == f"{SANDBOX_RELEASE}\n"
        run(ip, "%pip --version")  # on the host: through the shell's own system
        assert len(calls) == 1 and calls[0].endswith("-m pip --version")
        run(ip, "%isolation off")
        assert ip.__dict__["system"] is earlier and "getoutput" not in ip.__dict__
        run(ip, "!echo after-off")
        assert calls[-1] == "echo after-off"
        run(ip, "%isolation on")
        run(ip, "%unload_ext gvisor_magic")
        assert ip.__dict__["system"] is earlier
        run(ip, "%load_ext gvisor_magic")
    finally:
        ip.__dict__.pop("system", None)


# -- %config Isolation.* -----------------------------------------------------------------


def test_config_rejects_invalid_values_and_keeps_the_previous(ip, caplog):
    settings = magics(ip).settings
    run(ip, "%config Isolation.mode = 'runsc'")
    run(ip, "%config Isolation.mode = 'bogus'")
    assert settings.mode == "runsc"
    assert ("Isolation.mode must be one of auto, runsc, docker, subprocess (or None), "
            "not 'bogus'") in caplog.text

    run(ip, "%config Isolation.timeout = 30")
    run(ip, "%config Isolation.timeout = -5")
    assert settings.timeout == 30.0
    assert "Isolation.timeout must be > 0 seconds or None, not -5.0" in caplog.text

    run(ip, "%config Isolation.max_output = 0")
    assert settings.max_output == 4 * 1024 * 1024
    assert "Isolation.max_output must be a positive number of bytes" in caplog.text


def test_config_rejects_a_non_executable_shell_and_keeps_bash(ip, caplog, capfd, runsc_works):
    settings = magics(ip).settings
    run(ip, "%config Isolation.shell = '/etc/passwd'")  # before anything read the default
    assert "Isolation.shell must be an executable absolute path, not '/etc/passwd'" \
        in caplog.text
    assert settings.shell == shutil.which("bash")
    run(ip, "%config Isolation.shell = 'sh'")
    assert "not 'sh'" in caplog.text and settings.shell == shutil.which("bash")
    run(ip, "%%isolated --quiet\necho ${BASH_VERSION:+bash}\n")
    assert capfd.readouterr().out == "bash\n"


def test_config_shell_is_used(ip, capfd, runsc_works):
    run(ip, "%config Isolation.shell = '/bin/sh'")
    run(ip, "%%isolated --quiet\necho ${BASH_VERSION:-not bash}\n")
    assert capfd.readouterr().out == "not bash\n"


def test_rejected_config_does_not_break_reloading(ip, capfd):
    run(ip, "%config Isolation.mode = 'bogus'")
    run(ip, "%config Isolation.network = True")
    run(ip, "%reload_ext gvisor_magic")
    settings = magics(ip).settings
    assert settings.mode is None
    assert settings.network is True  # accepted settings survive the reload
    assert "ignoring a rejected setting: Isolation.mode must be one of" in capfd.readouterr().err


def test_config_route_bang_turns_routing_on_and_off(ip, runsc_works):
    run(ip, "%config Isolation.route_bang = True")
    assert "system" in ip.__dict__
    assert run(ip, "!!uname -r") == [SANDBOX_RELEASE]
    run(ip, "%config Isolation.route_bang = False")
    assert "system" not in ip.__dict__
    assert run(ip, "!!uname -r") == [HOST_RELEASE]


def test_config_quiet_and_mode(ip, capfd):
    run(ip, "%config Isolation.quiet = True")
    run(ip, "%config Isolation.mode = 'subprocess'")
    run(ip, "%%isolated\nuname -r\n")
    assert capfd.readouterr() == (f"{HOST_RELEASE}\n", "")


# -- the status widget ---------------------------------------------------------------------


def test_widget_keeps_the_default_apart_from_the_last_cell(ip, runsc_works):
    widget = gvisor_magic.status_widget()
    assert repr(widget) == "gvisor-magic: isolated by gVisor (runsc) | network off"
    assert f"border-left:6px solid {GREEN}" in widget.value
    assert "last command" not in widget.value
    assert "<svg" in widget.value and "&#x1F6E1;" not in widget.value  # no emoji font needed

    run(ip, "%%isolated --quiet\ntrue\n")
    assert repr(widget) == ("gvisor-magic: isolated by gVisor (runsc) | network off"
                            " | last: exit 0")
    assert f"border-left:6px solid {GREEN}" in widget.value
    assert re.search(r"<td>runsc: exit 0 in \d+\.\d\ds</td>", widget.value)

    # One cell sent to the host does not turn the kernel's panel amber: its own row does.
    run(ip, "%%isolated --quiet --mode subprocess --no-raise-error\nexit 2\n")
    assert repr(widget) == ("gvisor-magic: isolated by gVisor (runsc) | network off"
                            " | last: subprocess, NOT isolated: exit 2")
    assert f"border-left:6px solid {GREEN}" in widget.value
    assert "<td>none (runs on the host)</td>" not in widget.value
    assert re.search(r"subprocess: exit 2 in \d+\.\d\ds — NOT isolated \(this cell&#x27;s "
                     r"own --mode\), network HOST NETWORK \(unfiltered, as the host itself\) "
                     r"for this cell</td>", widget.value)
    assert f"color:{AMBER};font-weight:600" in widget.value
    # It ran one-shot on the host: the kernel's warm sandbox is still there, unreplaced.
    assert "<td>warm (runsc)</td>" in widget.value

    run(ip, "%%isolated --quiet\ntrue\n")
    assert repr(widget).endswith("| last: exit 0")
    assert f"color:{AMBER};font-weight:600" not in widget.value

    # The kernel's own default sent elsewhere does turn it amber.
    run(ip, "%config Isolation.mode = 'subprocess'")
    run(ip, "%%isolated --quiet\ntrue\n")
    assert repr(widget) == "gvisor-magic: NOT isolated (subprocess) | network off | last: exit 0"
    assert f"border-left:6px solid {AMBER}" in widget.value
    assert "<td>none (runs on the host)</td>" in widget.value
    assert "mode &#x27;subprocess&#x27; was requested" in widget.value

    status = run(ip, "%isolation status")
    assert repr(status) == repr(widget) and status.value == widget.value
    assert "application/vnd.jupyter.widget-view+json" in status._repr_mimebundle_()


def test_widget_limits_row_says_what_the_default_backend_enforces(ip, runsc_works):
    widget = gvisor_magic.status_widget()
    run(ip, "%%isolated --quiet --mode subprocess --limit memory=1G\ntrue\n")
    assert re.search(r"memory 4 GiB \((host cgroup|watchdog)\), cpus unlimited", widget.value)
    assert "NOT enforced on the host" not in widget.value
    run(ip, "%config Isolation.mode = 'docker'")
    run(ip, "%%isolated --quiet\ntrue\n")
    assert "memory 4 GiB (container cgroup)" in widget.value


def test_widget_turns_red_when_required_isolation_is_blocked(ip, monkeypatch, tmp_path):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", "/bin/false")
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    REGISTRY.forget()
    widget = gvisor_magic.status_widget()
    assert repr(widget) == "gvisor-magic: NOT isolated (subprocess) | network off"
    assert f"border-left:6px solid {AMBER}" in widget.value

    # One cell that requires isolation is blocked: its row says so, the default stands.
    marker = tmp_path / "ran"
    with pytest.raises(IsolationUnavailable, match="isolation is required"):
        run(ip, f"%%isolated --require-isolation\ntouch {marker}\n")
    assert not marker.exists()
    assert repr(widget) == "gvisor-magic: NOT isolated (subprocess) | network off | last: blocked"
    assert f"border-left:6px solid {AMBER}" in widget.value
    assert ("blocked: cannot run the command with runsc or docker and isolation is required"
            in widget.value) and f"color:{RED};font-weight:600" in widget.value

    # Required for every command of the kernel: the whole panel is red.
    run(ip, "%config Isolation.require_isolation = True")
    with pytest.raises(IsolationUnavailable, match="isolation is required"):
        run(ip, f"%%isolated\ntouch {marker}\n")
    assert not marker.exists()
    assert repr(widget) == ("gvisor-magic: BLOCKED: isolation required but unavailable"
                            " | network off | last: blocked")
    assert f"border-left:6px solid {RED}" in widget.value
    assert (">blocked</td><td style='color:#cf222e;font-weight:600'>") in widget.value


# -- the kernel's warm sandbox ---------------------------------------------------------


def test_cells_share_one_warm_sandbox_and_restart_replaces_it(ip, capfd, runsc_works):
    run(ip, "%%isolated --result first\necho kept > /tmp/note")
    run(ip, "%%isolated --result second\ncat /tmp/note")
    first, second = ip.user_ns["first"], ip.user_ns["second"]
    assert second.stdout == "kept\n"
    assert first.details["session"] == second.details["session"]
    assert magics(ip).sessions.describe() == "warm (runsc)"
    run(ip, "%isolation restart")
    assert "replaced" in capfd.readouterr().out
    run(ip, "%%isolated --result third --no-raise-error\ncat /tmp/note")
    third = ip.user_ns["third"]
    assert third.returncode == 1 and third.details["session"] != first.details["session"]


def test_fresh_runs_in_a_one_shot_sandbox(ip, capfd, runsc_works):
    run(ip, "%%isolated --result warm\necho in-session > /tmp/note")
    run(ip, "%%isolated --fresh --result fresh --no-raise-error\ncat /tmp/note; uname -r")
    fresh = ip.user_ns["fresh"]
    assert "session" not in fresh.details and "sandbox_id" in fresh.details
    assert fresh.stdout == "4.4.0\n" and "No such file" in fresh.stderr


def test_widget_shows_the_session_state(ip, capfd, runsc_works):
    run(ip, "%%isolated\ntrue")
    widget = run(ip, "%isolation status")
    assert "warm (runsc)" in widget.value
    run(ip, "%config Isolation.warm_session = False")
    run(ip, "%%isolated\ntrue")
    assert "off (a fresh sandbox per command)" in widget.value


def test_max_output_applies_to_the_warm_sandbox(ip, capfd, runsc_works):
    run(ip, "%config Isolation.max_output = 1000")
    run(ip, "%%isolated --out log --result noisy --quiet\nseq 100000")
    assert len(ip.user_ns["log"]) == 1000 and ip.user_ns["noisy"].truncated
    assert "session" in ip.user_ns["noisy"].details  # the warm sandbox, not a one-shot run


def test_a_cell_that_needs_another_sandbox_says_its_tmp_is_gone(ip, capfd, runsc_works):
    """The kernel keeps one warm sandbox: a cell with other options replaces it, and says
    that what the previous one kept in /tmp and HOME is not there (never silently)."""
    run(ip, "%%isolated --quiet\necho kept > /tmp/state\n")
    run(ip, "%%isolated --quiet\ncat /tmp/state\n")
    assert "kept" in capfd.readouterr().out
    # A cell on another backend runs one-shot there and leaves the warm sandbox alone.
    run(ip, "%%isolated --quiet --mode subprocess\ntrue\n")
    run(ip, "%%isolated --quiet\ncat /tmp/state\n")
    out, err = capfd.readouterr()
    assert "kept" in out and "another sandbox" not in err
    run(ip, "%%isolated --quiet --no-raise-error --limit max_open_files=1000\ncat /tmp/state\n")
    err = capfd.readouterr().err
    assert "needs another sandbox" in err and "other limits" in err, err
    assert "/tmp and HOME" in err
    run(ip, "%%isolated --quiet --limit max_open_files=1000\ntrue\n")
    assert "another sandbox" not in capfd.readouterr().err


# -- the network ----------------------------------------------------------------------------

FETCH = ("python3 -c \"import sys, urllib.request as u\n"
         "for url in sys.argv[1:]:\n"
         "    try: print(u.urlopen(url, timeout=10).read().decode().strip())\n"
         "    except OSError as e: print('refused', e)\" ")


def test_a_cell_names_its_network_and_is_told_what_was_refused(ip, capfd, runsc_works):
    from egress_servers import plain_server

    with plain_server(b"allowed\n") as allowed, plain_server(b"other\n") as other:
        run(ip, f"%%isolated --network 127.0.0.1:{allowed.port} --result r\n"
                f"{FETCH}{allowed.url}/a {other.url}/b\n")
        out, err = capfd.readouterr()
        assert other.hits == []
        assert out.splitlines()[0] == "allowed" and "refused" in out.splitlines()[1]
        # Loud, on stderr: where it ran, the policy, and the refused destination with its fix.
        assert f"network: allowlist: 127.0.0.1:{allowed.port}" in err
        assert ("WARNING: network: the command tried to reach what this sandbox may not"
                in err), err
        assert f"127.0.0.1:{other.port}: port {other.port} is not allowed" in err
        assert f"--allow-host 127.0.0.1:{other.port} allows it" in err
        # --allow-host adds to it; the widget shows the cell's own network and what it refused.
        run(ip, f"%%isolated --quiet --allow-host 127.0.0.1:{allowed.port} "
                f"--allow-host {other.authority}\n{FETCH}{allowed.url}/c {other.url}/d\n")
        assert capfd.readouterr().out == "allowed\nother\n"
    widget = gvisor_magic.status_widget()
    assert repr(widget).startswith("gvisor-magic: isolated by gVisor (runsc) | network off")
    assert (f"network allowlist: 127.0.0.1:{allowed.port}, {other.authority} for this cell"
            in html.unescape(widget.value))


def test_the_network_setting_is_checked_and_shown(ip, caplog, runsc_works):
    run(ip, "%config Isolation.network = 'https://pypi.org/simple'")
    assert "Isolation.network: 'https://pypi.org/simple': name a host" in caplog.text
    assert magics(ip).settings.network is False
    run(ip, "%config Isolation.network = 'pypi'")
    widget = gvisor_magic.status_widget()
    assert repr(widget) == "gvisor-magic: isolated by gVisor (runsc) | network allowlist: pypi"
    with pytest.raises(UsageError, match="not a URL"):
        run(ip, "%%isolated --network http://x/\ntrue\n")
    with pytest.raises(UsageError, match="non-canonical"):
        run(ip, "%isolated --allow-host 2130706433 true")


def test_network_alone_is_read_as_public(ip):
    """``--network`` with no value is ``public``, as the README says (it answered
    "expected one argument"). Without runsc, public is refused rather than run unfiltered,
    which shows how the option was read."""
    for code in ("%%isolated --mode subprocess --network\ntrue\n",
                 "%%isolated --mode subprocess --network --quiet\ntrue\n",
                 "%isolated --mode subprocess --network -- true",
                 "%isolated --network --mode subprocess -- true"):
        with pytest.raises(IsolationUnavailable, match="public internet"):
            run(ip, code)
    with pytest.raises(UsageError, match="'true' was read as --network's value: write "
                                         "--network -- COMMAND"):
        run(ip, "%isolated --mode subprocess --network true")


def test_network_alone_in_a_sandbox_with_allow_host(ip, capfd, runsc_works):
    from egress_servers import plain_server

    with plain_server(b"named\n") as named, plain_server(b"other\n") as other:
        run(ip, f"%%isolated --network --result r\n{FETCH}{named.url}/a\n")
        out, _ = capfd.readouterr()
        assert out.startswith("refused")  # loopback is not public
        assert ip.user_ns["r"].network_policy == (
            "public internet through the host's filtering proxy")
        with open("fetch.py", "w") as script:  # the cwd: the sandbox's working dir
            script.write(FETCH.split('"')[1])
        run(ip, f"%isolated --network --allow-host {named.authority} --result r -- "
                f"python3 fetch.py {named.url}/b {other.url}/c")
        out, err = capfd.readouterr()
        assert named.hits == ["GET /b"] and other.hits == []
    assert out.splitlines()[0] == "named" and out.splitlines()[1].startswith("refused")
    assert ip.user_ns["r"].network_policy == (
        f"public internet through the host's filtering proxy, and: {named.authority}")
    assert f"--allow-host {other.authority} allows it" in err
