"""A wheel is the product: built with ``python -m build``, checked by twine, installed into a
clean venv of the machine's own Python by an ordinary user, and used there as a user would:
``gvisor-magic doctor``, an isolated command, ``%load_ext`` and a cell in a real kernel.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USER = "gvisor-magic-test"
SYSTEM_PYTHON = "/usr/bin/python3"
#: Everything the sandbox runs comes from the wheel, not from a checkout.
SANDBOX_FILES = ("gvisor_magic/sandboxed/session_agent.py",
                 "gvisor_magic/sandboxed/agent_wire.py",
                 "gvisor_magic/sandboxed/sandbox_init.py",
                 "gvisor_magic/backends/reaper.py",
                 "gvisor_magic/install/runsc.py",
                 "gvisor_magic/install/docker_runtime.py")

KERNEL_CHECK = r"""
import sys
from jupyter_client.manager import start_new_kernel

km, kc = start_new_kernel(kernel_name="python3")
try:
    for code in ("%load_ext gvisor_magic", "%%isolated\nuname -r\nid -u\n"):
        reply = kc.execute_interactive(code, timeout=120,
                                       output_hook=lambda msg: outputs.append(msg))
        if reply["content"]["status"] != "ok":
            sys.exit(f"cell failed: {code!r}: {reply['content']}")
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir",
                           str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_build_makes_a_wheel_and_an_sdist_that_twine_accepts(dist):
    from gvisor_magic import __version__

    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"gvisor_magic-{__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"gvisor_magic-{__version__}.tar.gz"]
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("PASSED") == 2, done.stdout + done.stderr


def test_the_wheel_holds_everything_the_sandbox_runs(dist):
    [wheel] = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in SANDBOX_FILES:
        assert path in names, path
        # The same bytes as in the tree the tests ran against.
        assert zipfile.ZipFile(wheel).read(path) == (ROOT / path).read_bytes(), path
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "notebooks/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gvisor-magic = gvisor_magic.cli:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()


@pytest.fixture(scope="module")
def user_venv(dist, runsc_works):
    """A venv of the machine's Python, owned by an ordinary user, with the wheel (and
    ipykernel, for the kernel check) installed by that user from the package index."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as the ordinary test user")
    for tool in ("useradd", "runuser", SYSTEM_PYTHON):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is needed (make test installs it)")
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        entry = pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="gvm-wheel-"))  # not root's private tmp dir
    os.chmod(base, 0o755)
    [wheel] = dist.glob("*.whl")
    shutil.copy2(wheel, base / wheel.name)
    os.chmod(base / wheel.name, 0o644)
    os.chown(base, entry.pw_uid, entry.pw_gid)
    env = {"PATH": f"{base / 'venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
           "HOME": str(base), "USER": USER, "LANG": "C.UTF-8", "TMPDIR": str(base),
           **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}}

    def as_user(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shutil.which("runuser"), "-u", USER, "--", *argv], env=env,
                              cwd=base, capture_output=True, text=True, timeout=timeout)

    made = as_user(SYSTEM_PYTHON, "-m", "venv", str(base / "venv"))
    assert made.returncode == 0, made.stderr
    pip = as_user(str(base / "venv" / "bin" / "pip"), "install", "--quiet",
                  "--disable-pip-version-check", str(base / wheel.name), "ipykernel",
                  "jupyter_client")
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    yield entry, base, as_user
    shutil.rmtree(base, ignore_errors=True)


def test_doctor_and_a_command_from_the_installed_wheel(user_venv):
    entry, base, as_user = user_venv
    gvisor_magic = str(base / "venv" / "bin" / "gvisor-magic")
    version = as_user(gvisor_magic, "--version")
    from gvisor_magic import __version__
    assert version.stdout.strip() == f"gvisor-magic {__version__}", version.stderr
    doctor = as_user(gvisor_magic, "doctor", "--require-isolation")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "runsc" in doctor.stdout
    ran = as_user(gvisor_magic, "run", "--mode", "runsc", "--", "sh", "-c", "uname -r; id -u")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.split() == ["4.4.0", str(entry.pw_uid)]
    assert "[gvisor-magic] runsc (gVisor): exit 0" in ran.stderr
    # The files the sandbox ran are the installed ones, not a checkout's.
    where = as_user(str(base / "venv" / "bin" / "python"), "-c",
                    "import gvisor_magic.sandboxed.session_agent as m; print(m.__file__)")
    assert where.stdout.startswith(str(base / "venv")), where.stdout + where.stderr


def test_load_ext_and_a_cell_in_a_kernel_from_the_installed_wheel(user_venv):
    entry, base, as_user = user_venv
    script = base / "kernel_check.py"
    script.write_text("outputs = []\n" + KERNEL_CHECK + "\nfor msg in outputs:\n"
                      "    if msg['msg_type'] == 'stream': print(msg['content']['text'], end='')\n"
                      "    if msg['msg_type'] == 'display_data':\n"
                      "        print(msg['content']['data']['text/plain'])\n")
    os.chmod(script, 0o644)
    done = as_user(str(base / "venv" / "bin" / "python"), str(script), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines() == ["4.4.0", str(entry.pw_uid),
                                        "[gvisor-magic] runsc (gVisor): exit 0"], done.stdout
