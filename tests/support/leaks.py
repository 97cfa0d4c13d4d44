"""What a test may leave behind: runsc processes, Docker containers, scratch directories.

``tests/conftest.py``'s autouse ``no_leaks`` fixture checks these around every test; they
are found by this test session's own temporary directory (``session_tmp``) and this
process's pid, so other suites running on the machine at the same time are not counted.
"""

from __future__ import annotations

import os

import psutil


def sandbox_processes(session_tmp: str) -> list[psutil.Process]:
    """runsc processes serving sandboxes of this test session (found by their state dir)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info.get("cmdline") or [])
        except psutil.Error:
            continue
        if session_tmp in cmdline and "gvisor-magic-" in cmdline:
            found.append(process)
    return found


def our_containers() -> list[str]:
    """Containers this test process created (by the backend's owner-pid label), if any."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        found = client.containers.list(
            all=True, filters={"label": f"io.github.gvisor-magic.owner-pid={os.getpid()}"})
        client.close()
    except Exception:  # no daemon here: nothing of ours can exist in it
        return []
    return [c.short_id for c in found]


def scratch_dirs(session_tmp: str) -> set[str]:
    """The sandboxes' scratch directories in this session's temporary directory."""
    return {name for name in os.listdir(session_tmp) if name.startswith("gvisor-magic-")}


def wait_for_watchers(base: str, timeout: float = 30.0) -> list[str]:
    """Wait until no process mentions ``base`` (the watchers of its run dirs' owners have
    removed what killed owners left there and exited); return the command lines still
    there after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        left = []
        for process in psutil.process_iter(["cmdline", "status"]):
            try:
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = process.info.get("cmdline") or []
            except psutil.Error:
                continue
            if any(base in part for part in cmdline):
                left.append(" ".join(cmdline)[:300])
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
