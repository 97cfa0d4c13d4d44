"""The "Python 3 (gVisor)" kernel, used as a notebook user would: every cell (Python,
``!``, ``subprocess``, C code) runs in gVisor; interrupt, restart, shutdown, a memory kill
and a machine without gVisor behave as a user needs. Checked from the host."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from support.kernel_helpers import execute

from gvisor_magic.kernel import DISPLAY_NAME, KERNEL_NAME, PROVISIONER_NAME
from gvisor_magic.kernel.kernelspec import kernel_json
from gvisor_magic.kernel.prestart import EXTENSION
from gvisor_magic.runner import REGISTRY

STARTUP = 120.0


def make_manager(tmp_path, config: dict | None = None) -> KernelManager:
    """A kernel manager for python3-gvisor from a kernelspec dir of the test's own; no
    kernel is started ahead of need unless ``config`` sets ``pool`` (see
    test_gvisor_kernel_pool.py)."""
    specs = tmp_path / "kernels"
    (specs / KERNEL_NAME).mkdir(parents=True, exist_ok=True)
    config = {"pool": 0, **(config or {})}
    (specs / KERNEL_NAME / "kernel.json").write_text(json.dumps(kernel_json(config)))
    return KernelManager(kernel_name=KERNEL_NAME,
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]))


@contextlib.contextmanager
def running(tmp_path, config: dict | None = None, cwd=None) -> Iterator[tuple]:
    """A started python3-gvisor kernel and its ready client; shut down gracefully after."""
    km = make_manager(tmp_path, config)
    km.start_kernel(cwd=str(cwd or tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def sandbox_of(km: KernelManager) -> list[psutil.Process]:
    """The runsc processes of this kernel's sandbox (below its launcher)."""
    try:
        launcher = psutil.Process(km.provisioner.process.pid)
        return [p for p in launcher.children(recursive=True) if "runsc" in p.name()]
    except (psutil.Error, AttributeError):
        return []


def texts(nb) -> list[str]:
    found = []
    for cell in nb.cells:
        found.append("".join(o.get("text", "") for o in cell.outputs
                             if o.get("output_type") == "stream").strip())
    return found


def test_the_kernelspec_names_the_provisioner_and_interrupts_by_message():
    spec = kernel_json({"network": "pypi"})
    assert spec["display_name"] == DISPLAY_NAME
    assert spec["interrupt_mode"] == "message"
    assert spec["argv"][:3] == [sys.executable, "-m", "ipykernel_launcher"]
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner == {"provisioner_name": PROVISIONER_NAME, "config": {"network": "pypi"}}
    from jupyter_client.provisioning import KernelProvisionerFactory

    assert KernelProvisionerFactory.instance()._check_availability(PROVISIONER_NAME), (
        "the entry point is not registered: pip install -e .")


def test_a_notebook_runs_entirely_in_gvisor(runsc_works, tmp_path, monkeypatch):
    work = tmp_path / "notebook"
    work.mkdir()
    (work / ".aws").mkdir()
    (work / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = AKIAs3cret\n")
    outside = tmp_path / f"outside-{uuid.uuid4().hex}.txt"
    monkeypatch.setenv("GVM_HOST_TOKEN", "host-token-s3cret")
    nb = new_notebook(cells=[
        new_code_cell("import os, subprocess\nprint(os.uname().release)"),
        new_code_cell("print(subprocess.run(['uname', '-r'], capture_output=True, "
                      "text=True).stdout.strip())"),
        new_code_cell("!uname -r"),
        new_code_cell("open('inside.txt', 'w').write('made inside')\n"
                      # Outside the notebook's dir: the sandbox's own /tmp, never the host's.
                      f"open({str(outside)!r}, 'w').write('x')\n"
                      "try:\n    open(os.__file__, 'a').write('# x')\n    print('WROTE')\n"
                      "except OSError as exc:\n    print('refused', type(exc).__name__)"),
        new_code_cell("print(os.environ.get('GVM_HOST_TOKEN'), sorted(os.environ)[:40])"),
        new_code_cell("print(open('.aws/credentials').read() if os.path.exists("
                      "'.aws/credentials') else 'no credentials')"),
        new_code_cell("import ctypes\nprint(ctypes.CDLL(None).getpid() > 1)"),
        new_code_cell("print(os.getcwd())"),
    ])
    km = make_manager(tmp_path)
    client = NotebookClient(nb, km=km, timeout=120, startup_timeout=STARTUP,
                            resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    finally:
        km.shutdown_kernel(now=False)  # the caller's kernel manager: nbclient leaves it up
    out = texts(nb)
    assert out[0] == "4.4.0", out
    assert out[1] == "4.4.0" and out[2] == "4.4.0", out
    assert out[3] == "refused OSError", out
    assert not outside.exists(), "a cell wrote outside the notebook's directory on the host"
    assert (work / "inside.txt").read_text() == "made inside"
    assert "host-token-s3cret" not in "".join(out), "the server's environment reached a cell"
    assert "AKIAs3cret" not in out[5], out[5]
    assert out[6] == "True" and out[7] == str(work)
    assert not km.is_alive()


def test_interrupt_restart_and_shutdown_behave_as_with_any_kernel(runsc_works, tmp_path):
    km = make_manager(tmp_path)
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP)
        assert execute(kc, "x = 41").reply["status"] == "ok"
        first = sandbox_of(km)
        assert first, "the kernel runs under runsc"
        timer = threading.Timer(3.0, km.interrupt_kernel)
        timer.start()
        looped = execute(kc, "while True: pass", timeout=90)
        timer.join()
        assert [name for name, _ in looped.errors] == ["KeyboardInterrupt"], looped.describe()
        assert execute(kc, "print(x + 1)").stdout == "42\n", "interrupt kept the kernel's state"
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=STARTUP)
        after = execute(kc, "print('x' in dir(), __import__('os').uname().release)")
        assert after.stdout == "False 4.4.0\n", after.describe()
        _, alive = psutil.wait_procs(first, timeout=15)
        assert not alive, "the restarted kernel's old sandbox is still running"
    finally:
        kc.stop_channels()
        family = sandbox_of(km)
        sockets = km.provisioner.sockets_dir if km.provisioner else None
        km.shutdown_kernel(now=False)
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, "the sandbox outlived shutdown"
    assert sockets and not os.path.exists(sockets), "the kernel's sockets dir was left"


def test_ipywidgets_work(runsc_works, tmp_path):
    with running(tmp_path) as (_km, kc):
        shown = execute(kc, "import ipywidgets\ns = ipywidgets.IntSlider(value=3)\n"
                            "display(s)\ns.value = 5\nprint(s.value)")
    assert shown.stdout == "5\n", shown.describe()
    assert any("application/vnd.jupyter.widget-view+json" in d for d in shown.displays)
    assert any(m.get("data", {}).get("state", {}).get("value") == 5
               for m in shown.comm_msgs), shown.comm_msgs


def test_a_memory_limit_ends_the_cell_or_the_kernel_as_jupyter_expects(runsc_works, tmp_path):
    """Past its memory limit a kernel either dies (the host's OOM killer took it: exit 137,
    and Jupyter sees a dead kernel) or the cell gets a MemoryError (gVisor refused the
    memory) and the kernel goes on, as a normal kernel would. Never more memory."""
    with running(tmp_path, {"limits": {"memory": "300M"}}) as (km, kc):
        assert execute(kc, "x = 1").reply["status"] == "ok"
        msg_id = kc.execute("chunks = [b'x' * (64 << 20) for _ in range(40)]")  # touched
        errors: list[str] = []
        deadline = time.monotonic() + 90
        while km.is_alive() and not errors and time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "error":
                errors.append(msg["content"]["ename"])
        if km.is_alive():
            assert errors == ["MemoryError"], "the cell neither failed nor ended the kernel"
            after = execute(kc, "print(x + 1)")
            assert after.stdout == "2\n", after.describe()
        else:
            assert km.provisioner.process.returncode == 137


def test_without_gvisor_no_kernel_starts_and_the_reason_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", str(tmp_path / "no-runsc-here"))
    REGISTRY.forget()
    km = make_manager(tmp_path)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError, match=r"Python 3 \(gVisor\) cannot start.*never runs "
                                           r"outside gVisor"):
        km.start_kernel(cwd=str(tmp_path))
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    # The launcher itself fails closed too (a provisioner that skipped the check).
    sockets = tmp_path / "s"
    sockets.mkdir()
    ran = subprocess.run(
        [sys.executable, "-m", "gvisor_magic.kernel.launch", "--sockets", str(sockets),
         "--working-dir", str(tmp_path), "--", sys.executable, "-c",
         f"open({str(tmp_path / 'ran')!r}, 'w')"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "GVISOR_MAGIC_RUNSC": str(tmp_path / "no-runsc-here")})
    assert ran.returncode == 1 and "cannot start here" in ran.stderr, ran
    assert not (tmp_path / "ran").exists(), "the kernel ran without gVisor"


def test_kernelspec_install_and_remove_from_the_cli(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_PATH": str(tmp_path / "prefix" / "share" / "jupyter")}
    cli = [sys.executable, "-m", "gvisor_magic.cli", "kernelspec"]
    done = subprocess.run([*cli, "install", "--user"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spec = tmp_path / "data" / "kernels" / KERNEL_NAME / "kernel.json"
    assert json.loads(spec.read_text())["display_name"] == DISPLAY_NAME
    listed = subprocess.run([sys.executable, "-m", "jupyter_client.kernelspecapp", "list",
                             "--json"], env=env, capture_output=True, text=True)
    assert KERNEL_NAME in json.loads(listed.stdout)["kernelspecs"]
    # Beside it, the server extension that starts its pooled kernels with the server,
    # enabled where `jupyter server extension enable --user` would, and valid there.
    enabled = tmp_path / ".jupyter" / "jupyter_server_config.d" / f"{EXTENSION}.json"
    assert enabled.exists()
    extensions = subprocess.run([sys.executable, "-m", "jupyter_server.extension.serverextension",
                                 "list"], env=env, capture_output=True, text=True)
    text = re.sub(r"\x1b\[[0-9;]*m", "", extensions.stdout + extensions.stderr)
    assert f"{EXTENSION} enabled" in text and "OK" in text.split(EXTENSION, 2)[-1], text
    done = subprocess.run([*cli, "install", "--prefix", str(tmp_path / "prefix"),
                           "--network", "pypi", "--limit", "memory=2G", "--writes", "review",
                           "--pool", "2"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "prefix" / "share" / "jupyter" / "kernels" / KERNEL_NAME
                         / "kernel.json").read_text())["metadata"]["kernel_provisioner"]
    assert config["config"] == {"network": "pypi", "limits": {"memory": "2G"},
                                "writes": "review", "pool": 2}
    bad = subprocess.run([*cli, "install", "--user", "--pool", "9"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "pool must be a whole number from 0 to 8" in bad.stderr
    bad = subprocess.run([*cli, "install", "--user", "--network", "http://x"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a URL" in bad.stderr, bad.stderr
    prefixed = tmp_path / "prefix" / "etc" / "jupyter" / "jupyter_server_config.d"
    assert (prefixed / f"{EXTENSION}.json").exists()
    for _ in range(2):
        gone = subprocess.run([*cli, "remove"], env=env, capture_output=True, text=True)
        assert gone.returncode == 0, gone.stderr
    assert not spec.exists()
    assert not enabled.exists() and not (prefixed / f"{EXTENSION}.json").exists()


def _pip_cell(index) -> str:
    return (f"%pip install --no-deps --retries 0 --timeout 5 --index-url {index.url}/simple "
            "gm-egress-probe")


def test_pip_install_needs_the_allowlist_and_installs_into_the_kernel_only(runsc_works,
                                                                           tmp_path):
    from support.egress_servers import pypi_index

    with pypi_index(tmp_path / "index") as index:
        for config, expect in ((None, "this kernel's network is off, so %pip can install "
                                      "only files already here"),
                               ({"network": index.authority}, "Successfully installed")):
            with running(tmp_path / ("on" if config else "off"), config, tmp_path) as (_, kc):
                pip = execute(kc, _pip_cell(index), timeout=120)
                imported = execute(kc, "import gm_egress_probe\nprint(gm_egress_probe.__file__)")
            assert expect in pip.stdout + pip.stderr, pip.describe()
            if config:
                assert imported.stdout.startswith("/tmp/kernel-packages/"), imported.describe()
            else:
                assert [name for name, _ in imported.errors] == ["ModuleNotFoundError"]
    import importlib.util

    assert importlib.util.find_spec("gm_egress_probe") is None, "it reached the host's Python"


def test_doctor_says_whether_the_gvisor_kernel_can_start(runsc_works, tmp_path):
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "none")}
    here = subprocess.run([sys.executable, "-m", "gvisor_magic.cli", "doctor", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    kernel = json.loads(here.stdout)["gvisor_kernel"]
    assert kernel["can_start"] is True and kernel["kernelspec"] is None, kernel
    env["GVISOR_MAGIC_RUNSC"] = str(tmp_path / "no-runsc-here")
    text = subprocess.run([sys.executable, "-m", "gvisor_magic.cli", "doctor"], env=env,
                          capture_output=True, text=True, timeout=120).stdout
    assert "Python 3 (gVisor) kernel: CANNOT start here: runsc is not usable" in text, text
    assert "kernelspec: not installed (gvisor-magic kernelspec install --user)" in text


def test_a_killed_server_leaves_no_sandbox_running(runsc_works, tmp_path):
    """SIGKILL the kernel's host process (as when the server dies): the sandbox goes too."""
    with running(tmp_path) as (km, kc):
        assert execute(kc, "x = 1").reply["status"] == "ok"
        family = sandbox_of(km)
        assert family
        km.provisioner.process.kill()
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"the sandbox outlived its kernel's host process: {alive}"
    # The next run of the same user reclaims what the killed process left on disk.
    from gvisor_magic import run_command_isolated

    run_command_isolated("true", working_dir=tmp_path, mode="runsc", reuse=False)


@pytest.mark.parametrize("how", ["now", "after a short shutdown_wait_time"])
def test_a_kernel_jupyter_kills_leaves_no_sandbox(runsc_works, tmp_path, how):
    """Jupyter kills a kernel's launcher (SIGKILL) when told to shut it down now, and when
    it has not exited within ``shutdown_wait_time`` of the shutdown request (SIGTERM at half
    of it, SIGKILL at the end: a loaded machine took longer than the default 5 s just to
    remove the sandbox). A killed launcher cannot remove its sandbox: its run dir and its
    runsc processes must still be gone when ``shutdown_kernel`` returns."""
    from gvisor_magic.run_dirs import run_dirs_of

    km = make_manager(tmp_path)
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP)
        assert execute(kc, "x = 1").reply["status"] == "ok"
        launcher = psutil.Process(km.provisioner.process.pid)
        family = [launcher, *launcher.children(recursive=True)]
        run_dirs = run_dirs_of(launcher.pid, tempfile.gettempdir())
        sockets = km.provisioner.sockets_dir
        assert run_dirs and any("runsc" in p.name() for p in family), (run_dirs, family)
    finally:
        kc.stop_channels()
        if how == "now":
            km.shutdown_kernel(now=True)
        else:
            km.shutdown_wait_time = 0.2
            km.shutdown_kernel(now=False)
    left = [path for path in run_dirs if os.path.exists(path)]
    assert not left, f"the killed kernel's sandbox run dir is still there: {left}"
    mentioning = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(path in cmdline for path in run_dirs):
            mentioning.append((process.pid, cmdline[:200]))
    assert not mentioning, f"processes of the killed kernel's sandbox still run: {mentioning}"
    _, alive = psutil.wait_procs(family, timeout=10)  # (zombies, until they are reaped)
    assert not alive, f"processes of the killed kernel are still there: {alive}"
    assert sockets and not os.path.exists(sockets), "the kernel's sockets dir was left"


SERVER = """
import json, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[2],
                   kernel_spec_manager=KernelSpecManager(kernel_dirs=[sys.argv[1]]))
km.start_kernel(cwd=sys.argv[3])
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
print(km.provisioner.process.pid, flush=True)
sys.stdin.read()
"""


def _kill_a_server_holding_a_kernel(tmp_path) -> str:
    """Start a server (a process holding a KernelManager) with a python3-gvisor kernel, SIGKILL
    it, wait until its kernel and sandbox are gone; return the kernel's private dir, left."""
    make_manager(tmp_path)  # writes the kernelspec
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "kernels"),
                               KERNEL_NAME, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = b""
        while not line.strip().isdigit():  # the kernel's own output shares the pipe
            line = server.stdout.readline()
            assert line, "the server ended before its kernel was ready"
        launcher = psutil.Process(int(line))
        argv = launcher.cmdline()
        kernel_dir = os.path.dirname(argv[argv.index("-f") + 1])
        family = [launcher, *launcher.children(recursive=True)]
        assert any("runsc" in p.name() for p in family)
        server.kill()
        server.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"the kernel outlived its server: {alive}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        server.stdout.close()
        server.stdin.close()
    # What the dead server could not remove: the key of the kernel's channels, its sockets.
    left = os.listdir(kernel_dir)
    assert "connection.json" in left and any(name.startswith("k-") for name in left), left
    return kernel_dir


def _assert_gone(kernel_dir: str) -> None:
    left = os.listdir(kernel_dir) if os.path.exists(kernel_dir) else []
    assert not os.path.exists(kernel_dir), f"the killed server's kernel dir is still there: {left}"


def test_a_killed_server_takes_its_gvisor_kernel_with_it(runsc_works, tmp_path):
    """SIGKILL the server (here a process holding a KernelManager): the kernel's host process
    notices it was orphaned and ends its sandbox, as ipykernel's parent poller would; the
    next run of the same user removes the kernel's private dir (connection file, sockets)."""
    kernel_dir = _kill_a_server_holding_a_kernel(tmp_path)
    from gvisor_magic import run_command_isolated

    result = run_command_isolated("true", working_dir=tmp_path, mode="runsc", reuse=False)
    assert result.success, result
    _assert_gone(kernel_dir)


def test_the_next_kernel_start_removes_what_a_killed_server_left(runsc_works, tmp_path):
    kernel_dir = _kill_a_server_holding_a_kernel(tmp_path)
    km = make_manager(tmp_path)
    km.start_kernel(cwd=str(tmp_path))
    try:
        _assert_gone(kernel_dir)
        assert os.path.isdir(km.provisioner.sockets_dir)  # its own is there
    finally:
        km.shutdown_kernel(now=False)
    assert km.provisioner.sockets_dir is None


BROKEN_RUNSC = """#!/bin/sh
echo "runsc: this runsc broke after the first kernel started" >&2
exit 1
"""


def test_a_runsc_broken_after_a_first_kernel_fails_the_next_start_with_the_reason(
        runsc_works, tmp_path, monkeypatch):
    """The working probe is cached by the server; a runsc broken since must not get the
    notebook a dead kernel: the start fails with the launcher's reason, leaving nothing."""
    with running(tmp_path) as (_, kc):
        assert execute(kc, "import os; print(os.uname().release)").stdout == "4.4.0\n"
    assert REGISTRY.cached("runsc").available  # what the next start would trust
    broken = tmp_path / "runsc-broken"
    broken.write_text(BROKEN_RUNSC)
    broken.chmod(0o755)
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", str(broken))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    km = make_manager(tmp_path)
    try:
        # The launcher's own reason, with runsc's own stderr line in it.
        with pytest.raises(RuntimeError, match=r"(?s)Python 3 \(gVisor\) cannot start: its sandbox "
                                               r"did not start \(cannot start a warm runsc "
                                               r"sandbox.*this runsc broke after the first "
                                               r"kernel started.*never runs outside gVisor"):
            km.start_kernel(cwd=str(tmp_path))
    finally:
        if km.has_kernel:  # before the fix: a kernel that could never answer
            km.shutdown_kernel(now=True)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert km.provisioner.sockets_dir is None
    assert not os.path.exists(km.connection_file), "its connection file (with the key) stayed"
    # The probe is no longer trusted: the next start fails before launching anything.
    with pytest.raises(RuntimeError, match="runsc is not usable here"):
        make_manager(tmp_path).start_kernel(cwd=str(tmp_path))
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
