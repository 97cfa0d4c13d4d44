""""Python 3 (gVisor)" kernels started ahead of need: the next kernel of the same settings,
folder and environment is one the server started before it was asked, with exactly what a
fresh one would have; another recipe never gets it; nothing outlives the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from test_gvisor_kernel import STARTUP, make_manager
from test_gvisor_kernel_writes import execute

from gvisor_magic.kernel.cells import control_path
from gvisor_magic.kernel.pool import POOL
from gvisor_magic.run_dirs import remove_orphan_kernel_dirs


def wait_for_pooled(count: int = 1, seconds: float = 180.0) -> list:
    """The pooled kernels, once ``count`` wait for a claim."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready = POOL.ready()
        if len(ready) >= count and not POOL.starting():
            return ready
        time.sleep(0.1)
    raise AssertionError(f"no {count} kernel(s) started ahead of need: {POOL.ready()}")


def start(km, cwd, session: str = "") -> object:
    env = dict(os.environ, **({"JPY_SESSION_NAME": session} if session else {}))
    km.start_kernel(cwd=str(cwd), env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=STARTUP)
    return kc


def stop(km, kc) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def test_the_next_kernel_of_a_recipe_is_the_one_started_ahead_of_need(runsc_works, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    first = make_manager(tmp_path, {"pool": 1})
    kc1 = start(first, work, "first.ipynb")
    second = kc2 = None
    try:
        assert not first.provisioner.from_pool
        [pooled] = wait_for_pooled()
        launcher = pooled.process.pid
        assert psutil.Process(launcher).children(recursive=True), "its sandbox is not running"
        second = make_manager(tmp_path, {"pool": 1})
        kc2 = start(second, work, "second.ipynb")
        assert second.provisioner.from_pool and second.provisioner.process.pid == launcher
        # What a fresh kernel of this notebook would have: gVisor, its folder, its notebook,
        # its own id for held writes; and the cells' writes are taken as they end.
        out, reply = execute(kc2, textwrap.dedent("""\
            import os
            print(os.uname().release, os.getcwd(), __session__)
            open('table.csv', 'w').write('a,b\\n')
            open('helper.py', 'w').write('X = 1\\n')
            """))
        assert reply["status"] == "ok", out
        assert f"4.4.0 {work} second.ipynb" in out
        assert (work / "table.csv").read_text() == "a,b\n"
        assert not (work / "helper.py").exists()
        assert f"--kernel {second.kernel_id}" in out, out
        assert os.path.exists(control_path(second.kernel_id))
        # The first kernel is untouched by the second's claim.
        out, _ = execute(kc1, "print(__session__, os.getcwd() if 'os' in dir() else 'fresh')")
        assert out.startswith("first.ipynb"), out
        # The pool started a replacement for the next one.
        [replacement] = wait_for_pooled()
        assert replacement.process.pid != launcher
    finally:
        stop(first, kc1)
        if second is not None and kc2 is not None:
            stop(second, kc2)
    POOL.reset()
    assert not POOL.ready() and not POOL.starting()


def test_another_recipe_never_gets_a_pooled_kernel(runsc_works, tmp_path):
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    first = make_manager(tmp_path, {"pool": 1})
    kc1 = start(first, work)
    try:
        [pooled] = wait_for_pooled()
        for config, cwd in (({"pool": 1}, other), ({"pool": 1, "network": "pypi"}, work),
                            ({"pool": 1, "limits": {"memory": "1G"}}, work)):
            km = make_manager(tmp_path / f"m{len(str(config))}{cwd.name}", config)
            kc = start(km, cwd)
            try:
                assert not km.provisioner.from_pool, (config, cwd)
                assert km.provisioner.process.pid != pooled.process.pid
                out, _ = execute(kc, "import os; print(os.getcwd())")
                assert out.strip() == str(cwd)
            finally:
                stop(km, kc)
            POOL.reset()  # what those starts pooled: not under test here
            POOL.fill(pooled.recipe, 0)
    finally:
        stop(first, kc1)
    assert pooled.process.poll() is not None, "the pooled kernel outlived the pool"


SERVER = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
from test_gvisor_kernel import make_manager
from pathlib import Path
from gvisor_magic.kernel.pool import POOL
from gvisor_magic.run_dirs import remove_orphan_kernel_dirs
km = make_manager(Path(sys.argv[1]), {"pool": 1})
km.start_kernel(cwd=sys.argv[1])
while not POOL.ready():
    time.sleep(0.1)
print("PIDS", km.provisioner.process.pid, POOL.ready()[0].process.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("end", ["exits", "is killed"])
def test_kernels_started_ahead_of_need_end_with_their_server(runsc_works, tmp_path, end):
    """A server that exits shuts its pooled kernels down; one killed with SIGKILL cannot,
    and they see their parent gone and stop, sandbox and all."""
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path),
                               os.path.dirname(__file__)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = b""  # its kernels write to its stdout too, as a server's do
        while not line.startswith(b"PIDS "):
            line = server.stdout.readline()
            assert line, "the server did not start a kernel and a pooled one"
        kernel, pooled = map(int, line.split()[1:])
        family = [psutil.Process(pid) for pid in (kernel, pooled)]
        family += [child for p in list(family) for child in p.children(recursive=True)]
        assert any("runsc" in p.name() for p in family)
        if end == "exits":
            server.stdin.close()
            server.wait(timeout=120)
        else:
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, f"processes outlived their server: {[p.pid for p in alive]}"
        # The kernels' private dirs (keys, sockets): the pooled one's goes with it when the
        # server exits; what a killed server left is the next kernel start's to remove.
        removed = [d for d in remove_orphan_kernel_dirs() if f"-kernel-{server.pid}-" in d]
        assert len(removed) == (1 if end == "exits" else 2), removed
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize("value", [-1, 9, "1", True, 1.5])
def test_a_bad_pool_setting_is_refused_with_the_range(value):
    from gvisor_magic.errors import InvalidRequestError
    from gvisor_magic.kernel.kernelspec import kernel_json

    with pytest.raises(InvalidRequestError, match="pool must be a whole number from 0 to 8"):
        kernel_json({"pool": value})


def test_a_pooled_kernel_that_died_is_never_handed_out(runsc_works, tmp_path):
    """A pooled kernel killed while it waits (its sandbox with it) is passed over: the next
    start makes a kernel of its own, which works, and what the dead one left is removed."""
    work = tmp_path / "work"
    work.mkdir()
    first = make_manager(tmp_path, {"pool": 1})
    kc1 = start(first, work)
    try:
        [pooled] = wait_for_pooled()
        family = [psutil.Process(pooled.process.pid),
                  *psutil.Process(pooled.process.pid).children(recursive=True)]
        for process in family:
            process.kill()
        psutil.wait_procs(family, timeout=30)
        second = make_manager(tmp_path, {"pool": 1})
        kc2 = start(second, work)
        try:
            assert not second.provisioner.from_pool
            out, _ = execute(kc2, "import os; print(os.uname().release, os.getcwd())")
            assert out.strip() == f"4.4.0 {work}"
        finally:
            stop(second, kc2)
        assert not os.path.exists(pooled.sockets_dir), "the dead kernel's dir stayed"
    finally:
        stop(first, kc1)


def test_a_claim_that_fails_starts_a_kernel_of_its_own(runsc_works, tmp_path, monkeypatch):
    """When the pooled kernel does not take its claim (here: refused at the claim), the
    start goes on with a fresh kernel in a private dir of its own, on the server's own
    connection; the pooled one is shut down and what it left removed."""
    from gvisor_magic.kernel.pool import PooledKernel

    work = tmp_path / "work"
    work.mkdir()
    first = make_manager(tmp_path, {"pool": 1})
    kc1 = start(first, work)
    try:
        [pooled] = wait_for_pooled()
        monkeypatch.setattr(PooledKernel, "claim", lambda self, *a, **k: "refused here")
        second = make_manager(tmp_path, {"pool": 1})
        kc2 = start(second, work, "second.ipynb")
        try:
            assert not second.provisioner.from_pool
            assert second.provisioner.sockets_dir != pooled.sockets_dir
            out, _ = execute(kc2, "import os; print(os.uname().release, os.getcwd(), "
                                  "__session__)")
            assert out.strip() == f"4.4.0 {work} second.ipynb"
        finally:
            stop(second, kc2)
        assert pooled.process.poll() is not None, "the unclaimed pooled kernel runs on"
        assert not os.path.exists(pooled.sockets_dir), "the pooled kernel's dir stayed"
    finally:
        stop(first, kc1)
