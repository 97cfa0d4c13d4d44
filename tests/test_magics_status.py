"""How a cell says where it ran: the quiet badge, the loud line on stderr for what needs
attention, and the status widget (the kernel's default apart from the last cell)."""

from __future__ import annotations

import re

import pytest
from support.ipython_shell import AMBER, GREEN, RED, SANDBOX_RELEASE, badges, run, status_lines

import gvisor_magic
from gvisor_magic import IsolationUnavailable
from gvisor_magic.runner import REGISTRY


def test_what_needs_attention_is_loud_on_stderr(ip, capfd, tmp_path, monkeypatch, runsc_works):
    monkeypatch.setenv("GVISOR_MAGIC_QUARANTINE_DIR", str(tmp_path / "quarantine"))
    run(ip, "%%isolated --mode subprocess\ntrue\n")
    [line] = status_lines(capfd.readouterr().err)
    assert line.startswith("[gvisor-magic] WARNING: subprocess (NOT isolated): exit 0")
    run(ip, "%%isolated --timeout 1 --no-raise-error\nsleep 20\n")
    [line] = status_lines(capfd.readouterr().err)
    assert re.fullmatch(r"\[gvisor-magic\] runsc \(gVisor\): timed out in \d+\.\d\ds", line)
    # Writes landing directly (held writes would keep these off the host, silently).
    run(ip, "%%isolated --writes direct\necho 'print(1)' > sitecustomize.py\n")
    err = capfd.readouterr().err
    assert "[gvisor-magic] runsc (gVisor): exit 0 in" in err and badges(ip) == []
    assert "WARNING: the command left files" in err and "sitecustomize.py" in err, err
    # --quiet drops the status line, never a warning.
    run(ip, "%%isolated --quiet --writes direct\necho 'print(1)' > colorsys.py\n")
    err = capfd.readouterr().err
    assert "quarantine" in err and "colorsys.py" in err and "(gVisor): exit" not in err


def test_config_quiet_silences_the_badge(ip, capfd, runsc_works):
    run(ip, "%config Isolation.quiet = True")
    run(ip, "%%isolated\nuname -r\n")
    assert capfd.readouterr() == (f"{SANDBOX_RELEASE}\n", "") and badges(ip) == []


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


def test_widget_shows_the_session_state(ip, capfd, runsc_works):
    run(ip, "%%isolated\ntrue")
    widget = run(ip, "%isolation status")
    assert "warm (runsc)" in widget.value
    run(ip, "%config Isolation.warm_session = False")
    run(ip, "%%isolated\ntrue")
    assert "off (a fresh sandbox per command)" in widget.value
