"""Faults: the runtime vanishing, a full state dir, many threads. Each ends in a clear
error or an honest fallback, never a hang, never a second run, nothing left behind.

Other faults are tested where their machinery lives, and the security report
runs those too: a sandbox SIGKILLed mid-command (test_fallback.py,
test_session.py), dockerd killed mid-command (test_docker_faults.py, on a
private daemon), 200 commands leaking nothing (test_session.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading

import pytest

from gvisor_magic import IsolatedSession, IsolationUnavailable, run_command_isolated


def test_runsc_removed_mid_session(runsc_works, tmp_path, monkeypatch):
    copy = tmp_path / "bin" / "runsc"
    copy.parent.mkdir()
    shutil.copy2(shutil.which("runsc") or "/usr/bin/runsc", copy)
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", str(copy))
    marker = tmp_path / "runs.log"
    session = IsolatedSession(tmp_path, mode="runsc")
    try:
        assert session.run("uname -r").stdout == "4.4.0\n"
        copy.unlink()
        # The running sandbox does not need the binary: the session keeps working.
        assert session.run(f"echo ran >> {marker}; uname -r").stdout == "4.4.0\n"
        session.restart()
        with pytest.raises(IsolationUnavailable, match="runsc"):
            session.run(f"echo ran >> {marker}")
    finally:
        session.close()
    assert marker.read_text() == "ran\n", "nothing may run twice, or after the runtime is gone"
    with pytest.raises(IsolationUnavailable) as caught:
        run_command_isolated(f"echo ran >> {marker}", mode="runsc", working_dir=tmp_path)
    assert "No such file" in caught.value.reasons["runsc"]
    # auto falls back honestly (Docker here, else the host), and says why.
    result = run_command_isolated("echo fallback", working_dir=tmp_path)
    assert result.stdout == "fallback\n" and "runsc" in result.fallback_reason


def test_runsc_replaced_by_a_broken_binary(runsc_works, tmp_path, monkeypatch):
    fake = tmp_path / "runsc"
    fake.write_text("#!/bin/sh\necho 'runsc version release-20991231.0'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", str(fake))
    marker = tmp_path / "ran"
    with pytest.raises(IsolationUnavailable) as caught:
        run_command_isolated(f"touch {marker}", mode="runsc", working_dir=tmp_path)
    assert caught.value.reasons["runsc"]
    assert not marker.exists()


@pytest.fixture
def full_tmpfs():
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tempfile.mkdtemp(prefix="gvm-full-", dir="/var/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", point],
                   check=True)
    try:
        with contextlib.suppress(OSError), open(os.path.join(point, "filler"), "wb") as handle:
            handle.write(b"x" * (1 << 20))
        yield point
    finally:
        subprocess.run(["umount", "-l", point], check=True)
        os.rmdir(point)


def test_state_dir_on_a_full_tmpfs(runsc_works, full_tmpfs, tmp_path, monkeypatch):
    monkeypatch.setenv("GVISOR_MAGIC_STATE_DIR", full_tmpfs)
    marker = tmp_path / "ran"
    with pytest.raises(IsolationUnavailable) as caught:
        run_command_isolated(f"touch {marker}", mode="runsc", working_dir=tmp_path)
    assert "No space left" in caught.value.reasons["runsc"]
    assert not marker.exists()
    with pytest.raises(IsolationUnavailable):
        IsolatedSession(tmp_path, mode="runsc").start()
    assert os.listdir(full_tmpfs) == ["filler"], "nothing may be left in the state dir"


@pytest.mark.parametrize("mode", ["runsc", "docker"])
def test_eight_threads_at_once(mode, request, tmp_path):
    request.getfixturevalue(f"{mode}_works")
    results: dict[int, object] = {}

    def worker(index: int) -> None:
        results[index] = run_command_isolated(
            f"echo {index} >> runs-{index}.log; uname -r", mode=mode, working_dir=tmp_path,
            timeout=120)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(results) == list(range(8))
    for index, result in results.items():
        assert result.success and result.stdout == "4.4.0\n", result.describe()
        assert (tmp_path / f"runs-{index}.log").read_text() == f"{index}\n"
