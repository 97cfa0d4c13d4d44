"""What docs/sandbox.md promises a command sees is what it sees, on both gVisor backends, one-shot
and warm: the same hostname variable and files, an empty resolver without network, no
set-group-ID directory left behind; and start-up errors that name their real cause."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from gvisor_magic import IsolatedSession, run_command_isolated
from gvisor_magic.backends.runsc import explain_failure, state_fix

LOOK = ("echo HOSTNAME=$HOSTNAME; echo hostname=$(cat /etc/hostname); "
        "echo resolv=$(wc -c < /etc/resolv.conf); grep -c gvisor-sandbox /etc/hosts; "
        "mkdir -p grp && chmod g+s grp; echo done")


@pytest.mark.parametrize("flavour", ["one-shot", "session"])
@pytest.mark.parametrize("mode", ["runsc", "docker"])
def test_both_backends_show_the_same_world(mode, flavour, request, tmp_path):
    request.getfixturevalue(f"{mode}_works")
    if flavour == "session":
        with IsolatedSession(tmp_path, mode=mode) as session:
            result = session.run(LOOK, timeout=60)
    else:
        result = run_command_isolated(LOOK, working_dir=tmp_path, mode=mode, timeout=60)
    lines = result.stdout.split()
    assert lines[:4] == ["HOSTNAME=gvisor-sandbox", "hostname=gvisor-sandbox", "resolv=0",
                         "1"], result.describe() + result.stdout + result.stderr
    assert "done" in lines
    # runsc refuses chmod g+s; Docker's runtime takes it, and it is removed afterwards.
    assert not os.stat(tmp_path / "grp").st_mode & stat.S_ISGID


def test_start_errors_name_their_real_cause(tmp_path):
    full = state_fix(str(tmp_path), OSError(errno.ENOSPC, "No space left on device"))
    assert "full" in full and "GVISOR_MAGIC_STATE_DIR" in full
    assert "install" not in full
    _reason, fix = explain_failure("creating container: write /x: no space left on device",
                                  str(tmp_path))
    assert "full" in fix and "install" not in fix
    denied = state_fix("/proc", OSError(errno.EACCES, "Permission denied"))
    assert "not writable" in denied
