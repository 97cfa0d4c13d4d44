"""Tests for the installer: ``gvisor-magic install`` / ``python -m gvisor_magic.install``
(and ``scripts/install_gvisor.py``, which runs it from a checkout).

The download path runs the real script against a real HTTP server on 127.0.0.1, also as an
ordinary user (root-only machinery: setpriv); ``--check`` reads the real machine. Nothing
here touches /etc or /usr. The rules alone (versions, CPU names, the apt source derived from
realistic configs, the method): tests/unit/test_installer_rules.py.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.user_switch import world_readable_copy

import gvisor_magic.install.runsc as inst

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_gvisor.py"
FAKE_RUNSC = b"#!/bin/sh\necho 'runsc version 0.0~20240729.0'\necho 'spec: 1.0.2-dev'\n"


ARCH = inst.machine_arch()


# --- download method, against a real local HTTP server -----------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def release_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on an ephemeral port serving ``{root}/{arch}/runsc[.sha512]``."""
    root = tmp_path / "release"
    (root / ARCH).mkdir(parents=True)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _publish(root: Path, body: bytes = FAKE_RUNSC, digest: str | None = None) -> str:
    (root / ARCH / "runsc").write_bytes(body)
    digest = hashlib.sha512(body).hexdigest() if digest is None else digest
    (root / ARCH / "runsc.sha512").write_text(f"{digest}  runsc\n")
    return digest


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # No proxies (127.0.0.1 must be reached directly), and a PATH on which the machine's real
    # /usr/bin/runsc cannot be found (the download method only looks at --prefix anyway).
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    clean.update(PATH="/nonexistent/gvisor-magic-test", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "gvisor_magic.install", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean,
        check=False,
    )


def _download(base_url: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    return _run("--method", "download", "--base-url", base_url, "--prefix", str(prefix))


def test_download_installs_verified_binary(release_server: tuple[str, Path], tmp_path: Path):
    base_url, root = release_server
    _publish(root)
    prefix = tmp_path / "bin"
    prefix.mkdir()
    result = _download(base_url, prefix)
    assert result.returncode == 0, result.stderr
    installed = prefix / "runsc"
    assert installed.read_bytes() == FAKE_RUNSC
    assert os.access(installed, os.X_OK)
    assert installed.stat().st_mode & 0o777 == 0o755
    assert "runsc version 0.0~20240729.0" in result.stdout
    assert sorted(os.listdir(prefix)) == ["runsc"]


def test_download_creates_missing_prefix(release_server: tuple[str, Path], tmp_path: Path):
    base_url, root = release_server
    _publish(root)
    prefix = tmp_path / "new" / "bin"
    result = _run(
        "--method", "download", "--prefix", str(prefix), env={"GVISOR_RELEASE_URL": base_url}
    )
    assert result.returncode == 0, result.stderr
    assert (prefix / "runsc").read_bytes() == FAKE_RUNSC


def test_download_wrong_checksum_fails_closed(release_server: tuple[str, Path], tmp_path: Path):
    base_url, root = release_server
    wrong = hashlib.sha512(b"something else").hexdigest()
    _publish(root, digest=wrong)
    prefix = tmp_path / "bin"
    prefix.mkdir()
    result = _download(base_url, prefix)
    assert result.returncode == 1
    assert f"expected {wrong}" in result.stderr
    assert f"got {hashlib.sha512(FAKE_RUNSC).hexdigest()}" in result.stderr
    assert "nothing installed" in result.stderr
    assert os.listdir(prefix) == []  # neither runsc nor a temp file


@pytest.mark.parametrize(
    "checksum",
    [None, "not a checksum\n", "ab" * 64 + "  other-file\n"],
    ids=["missing-404", "garbage", "other-file-name"],
)
def test_download_bad_or_missing_checksum_fails_closed(
    release_server: tuple[str, Path], tmp_path: Path, checksum: str | None
):
    base_url, root = release_server
    _publish(root)
    sha_file = root / ARCH / "runsc.sha512"
    if checksum is None:
        sha_file.unlink()  # the server answers 404
    else:
        sha_file.write_text(checksum)
    prefix = tmp_path / "bin"
    prefix.mkdir()
    result = _download(base_url, prefix)
    assert result.returncode == 1
    assert "cannot verify runsc" in result.stderr
    assert ("HTTP 404" if checksum is None else "unparseable checksum") in result.stderr
    assert os.listdir(prefix) == []


def test_download_http_error_on_binary_fails_closed(
    release_server: tuple[str, Path], tmp_path: Path
):
    base_url, root = release_server
    _publish(root)
    (root / ARCH / "runsc").unlink()
    prefix = tmp_path / "bin"
    prefix.mkdir()
    result = _download(base_url, prefix)
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr and "nothing installed" in result.stderr
    assert os.listdir(prefix) == []


def test_download_too_old_release_fails_closed(release_server: tuple[str, Path], tmp_path: Path):
    base_url, root = release_server
    _publish(root, FAKE_RUNSC.replace(b"20240729", b"20221219"))
    prefix = tmp_path / "bin"
    prefix.mkdir()
    result = _download(base_url, prefix)
    assert result.returncode == 1
    assert "unusable" in result.stderr and "20221219" in result.stderr
    assert os.listdir(prefix) == []


def test_download_is_idempotent(release_server: tuple[str, Path], tmp_path: Path):
    base_url, root = release_server
    _publish(root)
    prefix = tmp_path / "bin"
    prefix.mkdir()
    assert _download(base_url, prefix).returncode == 0
    before = (prefix / "runsc").stat()
    # Even a now-broken server must not matter: nothing is fetched the second time.
    (root / ARCH / "runsc.sha512").unlink()
    second = _download(base_url, prefix)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    after = (prefix / "runsc").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(os.listdir(prefix)) == ["runsc"]


def test_download_replaces_too_old_runsc_in_prefix(
    release_server: tuple[str, Path], tmp_path: Path
):
    base_url, root = release_server
    _publish(root)
    prefix = tmp_path / "bin"
    prefix.mkdir()
    old = prefix / "runsc"
    old.write_bytes(FAKE_RUNSC.replace(b"20240729", b"20221219"))
    old.chmod(0o755)
    result = _download(base_url, prefix)
    assert result.returncode == 0, result.stderr
    assert old.read_bytes() == FAKE_RUNSC


NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, setpriv and /usr/bin/python3 to run the script as an ordinary user",
)


def _run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gvisor_magic.install`` as uid/gid 65534 with the system python (pyenv
    lives under /root, and it has none of the package's dependencies: the installer needs
    none), from a copy of the package nobody can read (a clone in a private directory is not)."""
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    readable = world_readable_copy(ROOT / "gvisor_magic")
    try:
        return subprocess.run(
            [*cmd, SYSTEM_PYTHON, "-m", "gvisor_magic.install", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=readable,
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        )
    finally:
        shutil.rmtree(readable, ignore_errors=True)


@needs_setpriv
def test_non_root_download_into_system_dir_asks_for_sudo(release_server: tuple[str, Path]):
    base_url, root = release_server
    _publish(root)
    prefix = "/usr/local/lib/gvisor-magic-test-does-not-exist"
    result = _run_as_nobody("--method", "download", "--base-url", base_url, "--prefix", prefix)
    assert result.returncode == 2, result.stderr
    assert "needs root; rerun with sudo" in result.stderr
    assert not os.path.exists(prefix)


@needs_setpriv
def test_non_root_download_into_own_prefix_works(release_server: tuple[str, Path]):
    base_url, root = release_server
    _publish(root)
    home = tempfile.mkdtemp(prefix="gvm-nobody-")  # tmp_path is not reachable for nobody
    try:
        os.chown(home, NOBODY, NOBODY)
        prefix = os.path.join(home, "bin")
        result = _run_as_nobody("--method", "download", "--base-url", base_url, "--prefix", prefix)
        assert result.returncode == 0, result.stderr
        installed = Path(prefix, "runsc")
        assert installed.read_bytes() == FAKE_RUNSC and installed.stat().st_uid == NOBODY
    finally:
        shutil.rmtree(home)


# --- --check against the real machine ------------------------------------------------------------


GVISOR_MAGIC = str(Path(sys.executable).with_name("gvisor-magic"))


@pytest.mark.parametrize("command", [
    [GVISOR_MAGIC, "install", "--check"],
    [sys.executable, "-m", "gvisor_magic.install", "--check"],
    [sys.executable, str(SCRIPT), "--check"],
], ids=["gvisor-magic-install", "python-m-gvisor_magic.install", "scripts-install_gvisor.py"])
def test_check_on_this_machine(command: list[str]) -> None:
    """Each way in runs the same installer; the script works from any cwd."""
    if not any(os.access(p, os.X_OK) for p in ("/usr/bin/runsc", "/usr/local/bin/runsc")):
        pytest.skip("no runsc installed on this machine")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False,
                            cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runsc version" in result.stdout and "[usable]" in result.stdout
    assert "newuidmap" in result.stdout
    assert "root:" in result.stdout


