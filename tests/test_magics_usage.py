"""The IPython extension's words before anything runs in gVisor: usage errors, help, ``%config``
checks, and ``--mode subprocess`` on the host. (Loading the extension starts the kernel's
warm sandbox in the background, so these are not unit tests; the option splitter alone is:
tests/unit/test_magics_split_options.py.)"""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from support.ipython_shell import HOST_RELEASE, OPTIONS, magics, run, status_lines

from gvisor_magic import IsolationUnavailable


def test_subprocess_mode_runs_on_the_host_and_warns(ip, capfd):
    run(ip, "%%isolated --mode subprocess\nuname -r\n")
    out, err = capfd.readouterr()
    assert out == f"{HOST_RELEASE}\n"
    [line] = status_lines(err)
    assert line.startswith("[gvisor-magic] WARNING: subprocess (NOT isolated): exit 0 in ")
    assert "fallback: mode 'subprocess' was requested: gVisor was not used" in line


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


def test_cell_help_lists_every_option(ip, capfd):
    run(ip, "%%isolated?")
    out = capfd.readouterr().out
    assert "Run the cell as a shell script in a gVisor sandbox." in out
    for option in OPTIONS:
        assert option in out, option


def test_line_magic_needs_a_command(ip):
    for line in ("%isolated   ", "%isolated --timeout 5", "%isolated --quiet --"):
        with pytest.raises(UsageError, match="%isolated needs a command"):
            run(ip, line)


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


def test_rejected_config_does_not_break_reloading(ip, capfd):
    run(ip, "%config Isolation.mode = 'bogus'")
    run(ip, "%config Isolation.network = True")
    run(ip, "%reload_ext gvisor_magic")
    settings = magics(ip).settings
    assert settings.mode is None
    assert settings.network is True  # accepted settings survive the reload
    assert "ignoring a rejected setting: Isolation.mode must be one of" in capfd.readouterr().err


def test_config_quiet_and_mode(ip, capfd):
    run(ip, "%config Isolation.quiet = True")
    run(ip, "%config Isolation.mode = 'subprocess'")
    run(ip, "%%isolated\nuname -r\n")
    assert capfd.readouterr() == (f"{HOST_RELEASE}\n", "")


def test_network_alone_is_read_as_public(ip):
    """``--network`` with no value is ``public``, as docs/network.md says (it answered
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
