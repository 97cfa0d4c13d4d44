"""The hosted path, for real: a JupyterHub user's ``%%isolated`` cells run under gVisor.

A real JupyterHub (DummyAuthenticator, local-process spawner, npm's
configurable-http-proxy) runs as root on 127.0.0.1. An ordinary system user
logs in through the hub's REST API and starts its single-user server, which
runs as that user with the hub's environment (``JUPYTERHUB_API_TOKEN``, a
secret of the user's, ``GVISOR_MAGIC_REQUIRE_ISOLATION=1``). Through the hub's
proxy the test opens a kernel, loads the extension and runs cells. A second,
named server of the same user gets ``GVISOR_MAGIC_RUNSC`` pointing at nothing
(a machine without a usable runsc): there the cell must raise, not run.
Afterwards the hub, proxy, servers, kernels and sandboxes are all gone, and so
is the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import hub as hubs
import psutil
import pytest

from gvisor_magic.kernel import KERNEL_NAME
from gvisor_magic.kernel.kernelspec import kernel_json

USER = "gvm-hub-user"
GVISOR_RELEASE = "4.4.0"
USER_SECRET = "e2e-user-secret-" + os.urandom(8).hex()
FILE_SECRET = "e2e-file-secret-" + os.urandom(8).hex()
SECRET_FILES = (".ssh/id_ed25519", ".aws/credentials", ".netrc")

pytestmark = [pytest.mark.runsc, pytest.mark.e2e]


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " -- `make test` installs what the hub test needs")
    pytest.skip(message)


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line names ``text`` (sandboxes: their state dir), killed."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if text in cmdline and proc.pid != os.getpid():
                found.append(f"{proc.pid}: {cmdline[:200]}")
                proc.kill()
    return found


def _user_processes(uid: int) -> list[str]:
    found = []
    for proc in psutil.process_iter(["uids", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if proc.info["uids"].real == uid or proc.info["uids"].effective == uid:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:200]}")
    return found


@pytest.fixture(scope="module")
def hub_user(runsc_works):
    """An ordinary system user with a subordinate uid range and secrets in its home."""
    if os.geteuid() != 0:
        pytest.skip("the hub must run as root to spawn servers as another user")
    for tool in ("useradd", "userdel", "usermod", "newuidmap"):
        if not shutil.which(tool):
            _unavailable(f"{tool} is needed (packages passwd, uidmap)")
    with contextlib.suppress(KeyError):
        pwd.getpwnam(USER)
        subprocess.run(["userdel", "--remove", USER], check=False, capture_output=True)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    entry = pwd.getpwnam(USER)
    try:
        if not any(line.startswith(f"{USER}:") for line in Path("/etc/subuid").read_text()
                   .splitlines()):
            subprocess.run(["usermod", "--add-subuids", "300000000-300065535",
                            "--add-subgids", "300000000-300065535", USER], check=True)
        home = Path(entry.pw_dir)
        for name in SECRET_FILES:
            path = home / name
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.write_text(FILE_SECRET + "\n")
            os.chmod(path, 0o600)
            os.chown(path.parent, entry.pw_uid, entry.pw_gid)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        yield entry
    finally:
        left = _user_processes(entry.pw_uid)
        for line in left:
            with contextlib.suppress(psutil.Error):
                psutil.Process(int(line.split(":")[0])).kill()
        subprocess.run(["userdel", "--remove", USER], check=False, capture_output=True)
        shutil.rmtree(entry.pw_dir, ignore_errors=True)
    assert not left, f"processes of {USER} left behind: {left}"


@pytest.fixture(scope="module")
def hub(hub_user):
    """The running hub, its user logged in; stopped afterwards, and nothing may survive."""
    if not os.access(hubs.PROXY, os.X_OK):
        _unavailable(f"{hubs.PROXY} is missing (run `make e2e-deps`)")
    try:
        import jupyter_server  # noqa: F401
        import jupyterhub  # noqa: F401
    except ImportError as exc:
        _unavailable(f"{exc.name} is not installed (pip install -e '.[e2e]')")
    python = hubs.user_python(hub_user.pw_uid, hub_user.pw_gid)
    base = Path(tempfile.mkdtemp(prefix="gvm-hub-"))
    os.chmod(base, 0o755)
    state = base / "hub"
    state.mkdir(mode=0o700)
    user_tmp = base / "user-tmp"
    user_tmp.mkdir(mode=0o700)
    os.chown(user_tmp, hub_user.pw_uid, hub_user.pw_gid)
    the_hub = None
    try:
        site = hubs.user_site(base)
        # "Python 3 (gVisor)" for the user's servers, started with the user's Python.
        kernels = base / "jupyter" / "kernels" / KERNEL_NAME
        kernels.mkdir(parents=True)
        (kernels / "kernel.json").write_text(json.dumps(kernel_json(python=python)))
        for path in (base / "jupyter", kernels.parent, kernels):
            os.chmod(path, 0o755)
        environment = dict(hubs.HUB_ENVIRONMENT, PYTHONPATH=str(site), TMPDIR=str(user_tmp),
                           PYTHONDONTWRITEBYTECODE="1", E2E_USER_SECRET=USER_SECRET,
                           JUPYTER_PATH=str(base / "jupyter"))
        the_hub = hubs.Hub(state=state, user=USER, python=python, environment=environment)
        the_hub.start()
        the_hub.log_in()
        yield the_hub
    finally:
        survivors = the_hub.stop() if the_hub is not None else []
        user_left = _user_processes(hub_user.pw_uid)
        # A rootless sandbox runs under the user's subordinate ids: find it by its state dir.
        sandboxes_left = _processes_mentioning(str(base))
        log = the_hub.log() if the_hub is not None else ""
        shutil.rmtree(base, ignore_errors=True)
    assert not survivors, f"still running after the hub stopped: {survivors}\n{log}"
    assert not user_left, f"processes of {USER} after the hub stopped: {user_left}"
    assert not sandboxes_left, f"sandboxes left behind: {sandboxes_left}"
    assert the_hub.process.returncode is not None


def _cells(hub: hubs.Hub, server: str, cells: list[str], kernel_name: str = "python3"
           ) -> list[dict]:
    """Start the server, run ``cells`` in one kernel, shut both down (kernel first)."""
    prefix = hub.start_server(server)
    try:
        kernel = hubs.Kernel(hub, prefix, kernel_name)
        try:
            return [kernel.execute(cell) for cell in cells]
        finally:
            kernel.shutdown()
    finally:
        hub.stop_server(server)


IDENTITY = "import os; print(os.getuid(), os.getcwd(), 'JUPYTERHUB_API_TOKEN' in os.environ)"
SANDBOX = """%%isolated --result r --out seen
uname -r
id -u
pwd
echo written > made-in-gvisor.txt
mkdir -p built && echo x > built/artifact
env
cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'
for f in .ssh/id_ed25519 .aws/credentials .netrc; do echo "$f: $(cat $f 2>&1)"; done
cat {state}/cookie_secret 2>&1
cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sed 's/^/interface /'
python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), 3)' \\
  && echo reached-the-hub || echo hub-unreachable
"""
REPORT = """import os, json
print(json.dumps({"backend": r.backend, "isolated": r.isolated, "rc": r.returncode,
                  "lines": seen.splitlines(),
                  "token_seen": os.environ["JUPYTERHUB_API_TOKEN"] in seen,
                  "user_secret_in_kernel": os.environ.get("E2E_USER_SECRET", "") != "",
                  "user_secret_seen": os.environ["E2E_USER_SECRET"] in seen}))"""
DOCTOR = "!{sys.executable} -m gvisor_magic.cli doctor"
FAIL_CLOSED = """%%isolated
echo ran > should-not-exist.txt"""


@pytest.fixture(scope="module")
def default_server(hub) -> list[dict]:
    cells = ["import sys", IDENTITY, "%load_ext gvisor_magic",
             SANDBOX.format(state=hub.state, port=hub.hub_port), REPORT, DOCTOR]
    return _cells(hub, "", cells)


@pytest.fixture(scope="module")
def no_runsc_server(hub, default_server) -> list[dict]:
    cells = ["import sys, os", "%load_ext gvisor_magic", FAIL_CLOSED,
             "print(os.path.exists('should-not-exist.txt'))", DOCTOR]
    return _cells(hub, hubs.NO_RUNSC_SERVER, cells)


def _report(default_server) -> dict:
    import json

    cell = default_server[4]
    assert cell["status"] == "ok", cell
    return json.loads(cell["stdout"])


def test_server_and_kernel_run_as_the_user_with_the_hub_token(default_server, hub_user):
    cell = default_server[1]
    assert cell["status"] == "ok", cell
    assert cell["stdout"].split() == [str(hub_user.pw_uid), hub_user.pw_dir, "True"]
    assert default_server[2]["status"] == "ok", default_server[2]


def test_isolated_cell_ran_under_gvisor_as_the_user(default_server, hub_user):
    cell = default_server[3]
    assert cell["status"] == "ok", cell
    # Success is a quiet badge (display_data), not a line on stderr.
    assert "[gvisor-magic] runsc (gVisor): exit 0" in cell["data"], cell
    assert "[gvisor-magic]" not in cell["stderr"], cell["stderr"]
    report = _report(default_server)
    assert (report["backend"], report["isolated"], report["rc"]) == ("runsc", True, 0)
    # The subordinate uid range keeps the user's own uid inside the user namespace.
    assert report["lines"][:3] == [GVISOR_RELEASE, str(hub_user.pw_uid), hub_user.pw_dir]


def test_files_written_in_the_working_dir_belong_to_the_user(default_server, hub_user):
    assert default_server[3]["status"] == "ok"
    home = Path(hub_user.pw_dir)
    for path in (home / "made-in-gvisor.txt", home / "built", home / "built" / "artifact"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (hub_user.pw_uid, hub_user.pw_gid), path
    assert (home / "made-in-gvisor.txt").read_text() == "written\n"


def test_hub_token_and_user_secrets_are_not_visible_inside(default_server):
    report = _report(default_server)
    assert report["user_secret_in_kernel"] is True  # the kernel has it: the check can fail
    assert report["token_seen"] is False
    assert report["user_secret_seen"] is False
    lines = report["lines"]
    assert not any(line.startswith("JUPYTERHUB_") for line in lines), lines
    text = "\n".join(lines)
    assert FILE_SECRET not in text
    for name in SECRET_FILES:
        assert any(line.startswith(f"{name}: ") for line in lines), (name, lines)
    assert any("cookie_secret: No such file or directory" in line for line in lines), lines


def test_network_is_off_inside(default_server):
    lines = _report(default_server)["lines"]
    assert "hub-unreachable" in lines and "reached-the-hub" not in lines
    # Only the sandbox's own loopback device exists.
    assert [line for line in lines if line.startswith("interface ")] == ["interface lo"]


def test_doctor_in_the_users_server_reports_runsc_rootless(default_server):
    cell = default_server[5]
    assert cell["status"] == "ok", cell
    assert "ok  runsc" in cell["stdout"], cell["stdout"]
    assert "commands will run with: runsc -> ISOLATED (gVisor)" in cell["stdout"]
    assert "require isolation: yes" in cell["stdout"]


def test_without_usable_runsc_the_hub_setting_fails_closed(no_runsc_server):
    load, failed, exists, doctor = no_runsc_server[1:5]
    assert load["status"] == "ok", load
    assert failed["status"] == "error", failed
    assert failed["error"][0] == "IsolationUnavailable", failed
    assert "isolation is required" in failed["error"][1]
    assert hubs.MISSING_RUNSC in failed["error"][1]
    assert exists["stdout"].strip() == "False", exists
    assert "require isolation: yes" in doctor["stdout"], doctor
    assert "commands will run with: runsc -> ISOLATED" not in doctor["stdout"]


GVISOR_KERNEL = """import os, subprocess, json
open("from-the-gvisor-kernel.csv", "w").write("a,b")  # lands when the cell ends
secrets = {}
for name in (".ssh/id_ed25519", ".aws/credentials", ".netrc"):
    try:
        secrets[name] = open(os.path.expanduser("~/" + name)).read()
    except OSError as exc:
        secrets[name] = type(exc).__name__
print(json.dumps({"release": os.uname().release, "uid": os.getuid(), "cwd": os.getcwd(),
                  "subprocess": subprocess.run(["uname", "-r"], capture_output=True,
                                               text=True).stdout.strip(),
                  "token": "JUPYTERHUB_API_TOKEN" in os.environ,
                  "user_secret": "E2E_USER_SECRET" in os.environ, "secrets": secrets}))"""


def test_the_gvisor_kernel_runs_as_the_user_in_gvisor(hub, hub_user, default_server):
    """The user picks "Python 3 (gVisor)": its Python, subprocesses and files are in gVisor,
    as the user, without the hub's token or the user's secrets."""
    import json

    cells = _cells(hub, "gvisor-kernel", [GVISOR_KERNEL], kernel_name=KERNEL_NAME)
    assert cells[0]["status"] == "ok", cells[0]
    seen = json.loads(cells[0]["stdout"])
    assert seen["release"] == "4.4.0" and seen["subprocess"] == "4.4.0", seen
    assert seen["uid"] == hub_user.pw_uid and seen["cwd"] == hub_user.pw_dir, seen
    assert not seen["token"] and not seen["user_secret"], seen
    assert FILE_SECRET not in json.dumps(seen["secrets"]), seen["secrets"]
    made = os.path.join(hub_user.pw_dir, "from-the-gvisor-kernel.csv")
    with open(made) as handle:
        assert handle.read() == "a,b" and os.stat(made).st_uid == hub_user.pw_uid


def test_the_gvisor_kernel_does_not_start_without_runsc(hub, no_runsc_server):
    """Where runsc cannot run, the kernel is refused with the reason: no host kernel."""
    prefix = hub.start_server(hubs.NO_RUNSC_SERVER)
    try:
        response = hub.call("POST", prefix + "api/kernels", {"name": KERNEL_NAME},
                            expect=(500,))
        assert "cannot start" in response.text and "never runs outside gVisor" in \
            response.text, response.text[:500]
        kernels = hub.call("GET", prefix + "api/kernels").json()
        assert kernels == [], kernels
    finally:
        hub.stop_server(hubs.NO_RUNSC_SERVER)
