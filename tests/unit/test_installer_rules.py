"""The installer's rules, without installing anything (``gvisor-magic install``): which runsc
versions are usable, CPU names, the apt source it derives from realistic configs in temp dirs,
os-release and the method it picks, its help, and that it needs only the standard library.
(Downloads against a local server, as an ordinary user, and ``--check`` on this machine:
tests/test_installer.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gvisor_magic.install.runsc as inst

MIRROR = "http://mirror.example/debian"
GVISOR_MAGIC = str(Path(sys.executable).with_name("gvisor-magic"))


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
