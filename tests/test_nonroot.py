"""The runsc tests again, run by an ordinary (non-root) user.

JupyterHub users are not root: their sandboxes go through user namespaces
(``newuidmap``), and files they write must belong to them. This test creates
such a user, gives it a copy of the package and the tests, and runs the
runsc test modules as that user with the machine's own Python.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

USER = "gvisor-magic-test"
ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.nonroot


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def user_tree(runsc_works):
    if os.geteuid() != 0:
        pytest.skip("already running as an ordinary user: the other test modules cover this")
    for tool in ("useradd", "runuser", SYSTEM_PYTHON):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is needed to test the non-root path (make test installs it)")
    entry = _ensure_user()
    # Not under pytest's own tmp dir: that one is private to root (0700).
    base = Path(tempfile.mkdtemp(prefix="gvm-nonroot-"))
    os.chmod(base, 0o755)
    shutil.copytree(ROOT / "gvisor_magic", base / "src" / "gvisor_magic",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", base / "src" / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "artifacts"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "--target", str(base / "site"),
                    "pytest>=8", "psutil>=5.9", "docker>=7.0,<8"], check=True)
    (base / "tmp").mkdir()
    for path in base.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chown(base / "tmp", entry.pw_uid, entry.pw_gid)
    yield entry, base
    shutil.rmtree(base, ignore_errors=True)


def _user_env(entry: pwd.struct_passwd, base: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": entry.pw_dir,
        "USER": USER,
        "PYTHONPATH": f"{base / 'src'}:{base / 'site'}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": str(base / "tmp"),  # removed with base, pytest's own basetemp included
        "GVISOR_MAGIC_TEST_REQUIRE_RUNSC": "1",
        "LANG": "C.UTF-8",
    }


def test_runsc_tests_pass_as_an_ordinary_user(user_tree):
    entry, base = user_tree
    env = _user_env(entry, base)
    done = subprocess.run(
        [shutil.which("runuser"), "-u", USER, "--", SYSTEM_PYTHON, "-m", "pytest", "-q",
         "-p", "no:cacheprovider",
         "--rootdir", str(base / "src"), "-o", "addopts=",
         # Docker is root's (or the docker group's) daemon: this user runs runsc itself.
         "-k", "not docker and not kernels_own_ports",
         str(base / "src" / "tests" / "test_backends.py"),
         str(base / "src" / "tests" / "test_fallback.py"),
         str(base / "src" / "tests" / "test_network_on.py"),
         # The allowlist's proxy socket, reached through runsc's gofer as this user.
         str(base / "src" / "tests" / "test_network_allowlist.py"),
         # The agent sealed off from commands, with this user's subordinate range.
         str(base / "src" / "tests" / "security" / "test_agent_sealed.py"),
         # Held writes: the layer mounted by the sandbox's root, copied out as this user.
         str(base / "src" / "tests" / "test_writes.py")],
        cwd=base / "src", env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 40, output[-3000:]
    assert "skipped" not in output, output[-3000:]


def test_protected_paths_hold_for_an_ordinary_user(user_tree):
    """A jovyan-like user: planted hooks, rc files and start-up files never fire on the host,
    secrets stay hidden, stand-ins leave no marks (tests/security/test_deferred.py, runsc).

    The user's Python is the machine's, without IPython and Jupyter: those two host tools
    cannot fire there, so the root run of the same tests is the one that proves them."""
    entry, base = user_tree
    done = subprocess.run(
        [shutil.which("runuser"), "-u", USER, "--", SYSTEM_PYTHON, "-m", "pytest", "-q", "-rs",
         "-p", "no:cacheprovider", "--rootdir", str(base / "src"), "-o", "addopts=",
         "-k", "runsc and not host_tools_fire",
         str(base / "src" / "tests" / "security" / "test_deferred.py")],
        cwd=base / "src", env=_user_env(entry, base), capture_output=True, text=True,
        timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 10, output[-3000:]
    # Only the cases a one-shot sandbox cannot have (they are about warm sessions).
    skips = re.findall(r"SKIPPED \[\d+\] [^\n]*", output)
    assert all("only a warm session" in line or "a warm gVisor session" in line
               for line in skips), skips


def test_files_written_by_an_ordinary_user_belong_to_that_user(user_tree):
    entry, base = user_tree
    work = base / "work"
    work.mkdir()
    os.chown(work, entry.pw_uid, entry.pw_gid)
    script = ("from gvisor_magic import run_command_isolated as r; import sys; "
              f"x = r('id -u; echo hi > out.txt', mode='runsc', working_dir={str(work)!r}); "
              "print(x.stdout.strip(), x.backend, x.isolated); sys.exit(x.returncode)")
    done = subprocess.run(
        [shutil.which("runuser"), "-u", USER, "--", SYSTEM_PYTHON, "-c", script],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{base / 'src'}:{base / 'site'}",
             "HOME": entry.pw_dir}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(entry.pw_uid), "runsc", "True"]
    assert (work / "out.txt").stat().st_uid == entry.pw_uid


def test_an_arbitrary_uid_without_a_passwd_entry_gets_runsc(runsc_works, tmp_path):
    """OpenShift and many Kubernetes set-ups run pods as a uid with no passwd entry and no
    subordinate range: newuidmap refuses it, so runsc once failed there and auto ran the
    command on the host. It now runs under gVisor, one-shot and warm, and writes as itself."""
    import psutil
    from support.user_switch import world_readable_copy

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to become an arbitrary uid")
    uid = 4242
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    readable = world_readable_copy(ROOT / "gvisor_magic", Path(psutil.__file__).parent)
    base = Path(tempfile.mkdtemp(prefix="gvm-anyuid-"))
    try:
        os.chmod(base, 0o755)
        for name in ("work", "tmp"):
            (base / name).mkdir()
            os.chown(base / name, uid, uid)
        script = ("from gvisor_magic import run_command_isolated as r, IsolatedSession\n"
                  f"w = {str(base / 'work')!r}\n"
                  "x = r('uname -r; echo one > one.txt', working_dir=w)\n"
                  "print(x.backend, x.isolated, x.stdout.split()[0])\n"
                  "with IsolatedSession(w) as s:\n"
                  "    y = s.run('uname -r; echo two > two.txt')\n"
                  "    z = s.run('kill -KILL 1 || echo agent-unreachable')\n"
                  "print(y.backend, y.isolated, y.stdout.split()[0])\n"
                  "print(z.stdout.strip(), 'session_note' in z.details)\n")
        done = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON,
             "-c", script],
            env={"PATH": "/usr/bin:/bin", "HOME": str(base / "tmp"), "TMPDIR": str(base / "tmp"),
                 "PYTHONPATH": readable}, cwd=base / "work", capture_output=True, text=True,
            timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == ["runsc", "True", "4.4.0"] * 2 + [
            "agent-unreachable", "False"], done.stdout
        for name in ("one.txt", "two.txt"):
            assert (base / "work" / name).stat().st_uid == uid
        assert not os.listdir(base / "tmp"), "the sandboxes left state behind"
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(readable, ignore_errors=True)
