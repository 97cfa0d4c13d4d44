"""``%config Isolation.shell``: what is accepted, and the shell a cell then runs in (gVisor).
Other settings: tests/test_magics_usage.py (checks), test_magics_status.py (quiet),
test_magics_routing.py (route_bang), test_magics_warm.py (warm_session, max_output)."""

from __future__ import annotations

import shutil

from support.ipython_shell import magics, run


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
