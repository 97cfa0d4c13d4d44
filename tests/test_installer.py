"""Tests for the installer: ``gvisor-magic install`` / ``python -m gvisor_magic.install``
(and ``scripts/install_gvisor.py``, which runs it from a checkout).

The download path runs the real script against a real HTTP server on 127.0.0.1; the apt
source derivation runs on copies of realistic apt configs in temp dirs. Nothing here
touches /etc or /usr (only ``--check`` reads the real machine).
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
from user_switch import world_readable_copy

import gvisor_magic.install.runsc as inst

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_gvisor.py"
MIRROR = "http://mirror.example/debian"
FAKE_RUNSC = b"#!/bin/sh\necho 'runsc version 0.0~20240729.0'\necho 'spec: 1.0.2-dev'\n"


ARCH = inst.machine_arch()


# --- version parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "date", "usable"),
    [
        ("runsc version 0.0~20240729.0\nspec: 1.0.2-dev\n", 20240729, True),
        ("runsc version release-20240729.0", 20240729, True),
        ("runsc version release-20230601.0", 20230601, True),
        ("runsc version 0.0~20221219.0\nspec: 1.0.2-dev", 20221219, False),
        ("runsc version release-20230531.0", 20230531, False),
        ("spec: 1.0.2-dev\nrunsc version 0.0~20240729.0", None, False),  # first line only
        ("runsc version 1.2.3", None, False),
        ("garbage", None, False),
        ("", None, False),
    ],
)
def test_version_parsing(output: str, date: int | None, usable: bool) -> None:
    assert inst.parse_release_date(output) == date
    assert inst.is_usable_version(output) is usable


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "x86_64"), ("amd64", "x86_64"), ("aarch64", "aarch64"), ("arm64", "aarch64")],
)
def test_machine_arch(machine: str, arch: str) -> None:
    assert inst.machine_arch(machine) == arch


def test_machine_arch_unsupported() -> None:
    with pytest.raises(inst.InstallError, match="unsupported CPU 'riscv64'"):
        inst.machine_arch("riscv64")


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


# --- apt source derivation, on temp copies of realistic configs ---------------------------------

DEBIAN_SOURCES = f"""\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: {MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-security.gpg
"""

NODE_SOURCES = """\
Types: deb
URIs: https://deb.vendor.example/node_20.x
Suites: nodistro
Components: main
Signed-By: /usr/share/keyrings/vendor.gpg
"""


@pytest.fixture
def apt_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(sources.list, sources.list.d, lists dir), all empty, under tmp_path."""
    etc = tmp_path / "etc" / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    lists = tmp_path / "lists"
    lists.mkdir()
    return etc / "sources.list", etc / "sources.list.d", lists


def _ensure(dirs: tuple[Path, Path, Path]) -> Path | None:
    sources_list, sources_dir, lists = dirs
    return inst.ensure_backports_source("bookworm", sources_list, sources_dir, lists)


def _fields(path: Path) -> dict[str, str]:
    """Fields of the single deb822 stanza in ``path`` (comment lines skipped)."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert all(line.strip() for line in lines), "expected exactly one stanza"
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines)}


def test_deb822_config_gets_backports_on_same_mirror(apt_dirs: tuple[Path, Path, Path]):
    _, sources_dir, _ = apt_dirs
    (sources_dir / "debian.sources").write_text(DEBIAN_SOURCES)
    (sources_dir / "nodesource.sources").write_text(NODE_SOURCES)
    (sources_dir / "old.list.disabled").write_text("deb http://old.example/debian bookworm main\n")
    written = _ensure(apt_dirs)
    assert written == sources_dir / "gvisor-magic-backports.sources"
    assert _fields(written) == {
        "Types": "deb",
        "URIs": MIRROR,
        "Suites": "bookworm-backports",
        "Components": "main",
        "Signed-By": "/usr/share/keyrings/debian-archive-keyring.gpg",
    }
    assert written.stat().st_mode & 0o777 == 0o644
    # Idempotent: the second call finds the suite (in our own file) and writes nothing.
    content, mtime = written.read_text(), written.stat().st_mtime_ns
    assert _ensure(apt_dirs) is None
    assert written.read_text() == content and written.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(sources_dir)) == [
        "debian.sources",
        "gvisor-magic-backports.sources",
        "nodesource.sources",
        "old.list.disabled",
    ]


def test_one_line_sources_list(apt_dirs: tuple[Path, Path, Path]):
    sources_list, sources_dir, _ = apt_dirs
    sources_list.write_text(
        "# main archive\n"
        f"deb [signed-by=/x.gpg] {MIRROR} bookworm main\n"
        f"deb-src [signed-by=/x.gpg] {MIRROR} bookworm main\n"
        "deb [signed-by=/x.gpg] http://mirror.example/debian-security bookworm-security main\n"
    )
    written = _ensure(apt_dirs)
    assert written == sources_dir / "gvisor-magic-backports.sources"
    assert _fields(written) == {
        "Types": "deb",
        "URIs": MIRROR,
        "Suites": "bookworm-backports",
        "Components": "main",
        "Signed-By": "/x.gpg",
    }
    assert _ensure(apt_dirs) is None


def test_existing_backports_entry_means_no_new_file(apt_dirs: tuple[Path, Path, Path]):
    sources_list, sources_dir, _ = apt_dirs
    (sources_dir / "debian.sources").write_text(DEBIAN_SOURCES)
    sources_list.write_text(f"deb {MIRROR} bookworm-backports main\n")
    assert _ensure(apt_dirs) is None
    assert sorted(os.listdir(sources_dir)) == ["debian.sources"]


def test_disabled_stanza_is_ignored(apt_dirs: tuple[Path, Path, Path]):
    _, sources_dir, _ = apt_dirs
    disabled = f"Enabled: no\nTypes: deb\nURIs: {MIRROR}\nSuites: bookworm-backports\n"
    (sources_dir / "debian.sources").write_text(DEBIAN_SOURCES + "\n" + disabled)
    assert _ensure(apt_dirs) is not None


def test_no_debian_bookworm_entry_is_a_clear_error(apt_dirs: tuple[Path, Path, Path]):
    sources_list, sources_dir, _ = apt_dirs
    (sources_dir / "nodesource.sources").write_text(NODE_SOURCES)
    sources_list.write_text(
        "deb http://mirror.example/debian-security bookworm-security main\n"
        "deb-src http://mirror.example/debian bookworm main\n"
    )
    with pytest.raises(inst.InstallError, match="no enabled Debian 'deb' entry for suite"):
        _ensure(apt_dirs)
    assert sorted(os.listdir(sources_dir)) == ["nodesource.sources"]


def test_release_origin_prefers_debian_over_third_party(apt_dirs: tuple[Path, Path, Path]):
    sources_list, sources_dir, lists = apt_dirs
    # A third-party repo that also has a "bookworm main" suite, read before Debian's entry.
    sources_list.write_text("deb [signed-by=/php.gpg] https://php.example/php bookworm main\n")
    (sources_dir / "debian.sources").write_text(DEBIAN_SOURCES)
    release = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: {}\nSuite: x\n"
    (lists / "php.example_php_dists_bookworm_InRelease").write_text(release.format("PHP"))
    (lists / "mirror.example_debian_dists_bookworm_InRelease").write_text(release.format("Debian"))
    written = _ensure(apt_dirs)
    assert written is not None
    assert _fields(written)["URIs"] == MIRROR
    assert inst.release_origin(MIRROR + "/", "bookworm", lists) == "Debian"
    assert inst.release_origin("http://other.example/debian", "bookworm", lists) is None


def test_embedded_signed_by_key_is_copied_verbatim(apt_dirs: tuple[Path, Path, Path]):
    _, sources_dir, _ = apt_dirs
    key = " -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBF\n -----END PGP PUBLIC KEY BLOCK-----"
    (sources_dir / "debian.sources").write_text(
        f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm\nComponents: main\nSigned-By:\n{key}\n"
    )
    written = _ensure(apt_dirs)
    assert written is not None
    assert written.read_text().endswith(f"Signed-By:\n{key}\n")
    [entry] = inst.parse_deb822(written.read_text(), written)
    assert entry.suites == ("bookworm-backports",) and entry.signed_by == "\n" + key


def test_read_os_release_and_method(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nVERSION_CODENAME=bookworm\nPRETTY_NAME="Debian 12"\n')
    info = inst.read_os_release(os_release)
    assert info["ID"] == "debian" and info["PRETTY_NAME"] == "Debian 12"
    assert inst.read_os_release(tmp_path / "missing") == {}
    has_apt = shutil.which("apt-get") is not None
    assert inst.choose_method("auto", info) == ("apt" if has_apt else "download")
    assert inst.choose_method("auto", {"ID": "fedora"}) == "download"
    assert inst.choose_method("download", info) == "download"


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


def test_install_help_names_the_command_it_was_run_as() -> None:
    for command, prog in (([GVISOR_MAGIC, "install", "--help"], "gvisor-magic install"),
                          ([sys.executable, "-m", "gvisor_magic.install", "--help"],
                           "python -m gvisor_magic.install")):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {prog} "), \
            result.stdout + result.stderr
        assert "--docker" in result.stdout and "--method" in result.stdout


def test_the_installer_imports_nothing_but_the_standard_library() -> None:
    """It must run where the package's dependencies are not (yet) installed."""
    probe = ("import sys\nimport gvisor_magic.install, gvisor_magic.cli\n"
             "third = sorted(m for m in sys.modules if m.split('.')[0] in "
             "{'psutil', 'docker', 'IPython', 'traitlets', 'ipywidgets', 'requests'})\n"
             "print(third)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
