"""Install gVisor's runsc so gvisor_magic can sandbox shell commands.

``gvisor-magic install`` and ``python -m gvisor_magic.install`` run this. Stdlib only, so it
runs before (or without) the package's dependencies. Exit codes: 0 success, 1 failure,
2 needs root. ``--check`` inspects the machine without changing anything. ``--docker`` also
registers runsc as a Docker runtime (``docker_runtime``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import http.client
import io
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import docker_runtime

# Debian bookworm's own runsc (20221219) fails even `ls /` with EINVAL; 20240729 works.
MIN_RELEASE_DATE = 20230601
DEFAULT_BASE_URL = "https://storage.googleapis.com/gvisor/releases/release/latest"
BASE_URL_ENV = "GVISOR_RELEASE_URL"
DEFAULT_PREFIX = Path("/usr/local/bin")
SYSTEM_DIRS = (Path("/usr/local/bin"), Path("/usr/bin"))
OS_RELEASE = Path("/etc/os-release")
SOURCES_LIST = Path("/etc/apt/sources.list")
SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_LISTS_DIR = Path("/var/lib/apt/lists")
BACKPORTS_FILE_NAME = "gvisor-magic-backports.sources"
DOWNLOAD_TIMEOUT = 60.0
PROGRESS_STEP = 10 * 1024 * 1024
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_VERSION_RE = re.compile(r"^runsc version (?:0\.0~|release-)(\d{8})(?:\.\d+)?\b")
_CHECKSUM_RE = re.compile(r"^([0-9a-fA-F]{128})(?:\s+\*?(\S+))?$")
_ONE_LINE_RE = re.compile(r"^(deb|deb-src)\s+(?:\[([^\]]*)\]\s*)?(\S+)\s+(\S+)\s*(.*)$")


class InstallError(Exception):
    """A failure shown to the user as one message; ``exit_code`` 2 means "rerun as root"."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_release_date(version_output: str) -> int | None:
    """YYYYMMDD from the first line of ``runsc --version``, or None if unrecognised.

    Debian spells it ``0.0~20240729.0``, upstream ``release-20240729.0``.
    """
    lines = version_output.strip().splitlines()
    match = _VERSION_RE.match(lines[0].strip()) if lines else None
    return int(match.group(1)) if match else None


def is_usable_version(version_output: str) -> bool:
    """True if new enough; unparseable output counts as unusable (fail closed)."""
    date = parse_release_date(version_output)
    return date is not None and date >= MIN_RELEASE_DATE


def runsc_version(path: Path) -> str | None:
    """First line of ``path --version``, or None if it cannot be run or fails."""
    try:
        proc = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def find_runsc(first_dirs: tuple[Path, ...] = (), path_env: str | None = None) -> list[Path]:
    """Executable runsc files: ``first_dirs`` (``--prefix``), then PATH, then system dirs.

    The first one is what gets used; duplicates via symlinks (/bin -> /usr/bin) are dropped.
    os.path is used because, unlike Path.is_file(), it treats unreadable PATH dirs as empty.
    """
    path_env = os.environ.get("PATH", "") if path_env is None else path_env
    dirs = [*first_dirs, *(Path(p) for p in path_env.split(os.pathsep) if p), *SYSTEM_DIRS]
    found: list[Path] = []
    for candidate in (d / "runsc" for d in dirs):
        is_exe = os.path.isfile(candidate) and os.access(candidate, os.X_OK)
        if is_exe and os.path.realpath(candidate) not in map(os.path.realpath, found):
            found.append(candidate)
    return found


def require_root(action: str) -> None:
    """Stop with exit code 2, before changing anything, if ``action`` needs root."""
    if os.geteuid() != 0:
        command = shlex.join(["python3", *sys.argv])
        raise InstallError(f"{action} needs root; rerun with sudo: sudo {command}", 2)


def read_os_release(path: Path = OS_RELEASE) -> dict[str, str]:
    """KEY=value pairs of os-release(5), quotes removed; a missing file gives {}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    pairs = (line.strip().partition("=") for line in lines if not line.startswith("#"))
    return {key: value.strip().strip("\"'") for key, sep, value in pairs if sep}


def choose_method(requested: str, os_release: dict[str, str]) -> str:
    """Resolve ``auto``: Debian, Ubuntu and derivatives (with apt-get) ship runsc via apt."""
    ids = {os_release.get("ID", ""), *os_release.get("ID_LIKE", "").split()}
    if requested != "auto":
        return requested
    return "apt" if ids & {"debian", "ubuntu"} and shutil.which("apt-get") else "download"


@dataclass(frozen=True)
class AptSource:
    """One enabled repository entry, from either the deb822 or the one-line format."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None
    origin: Path


def parse_deb822(text: str, origin: Path) -> list[AptSource]:
    """Entries of a ``*.sources`` file, skipping stanzas marked ``Enabled: no``.

    Continuation lines are kept verbatim, so a multi-line ``Signed-By`` key survives a copy.
    """
    sources = []
    for block in re.split(r"\n\s*\n", text):
        st: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                st[key] += "\n" + line.rstrip()
            elif ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                key = key.strip().lower()
                st[key] = value.strip()
        if st and st.get("enabled", "yes").strip().lower() != "no":
            fields = (st.get(k, "").split() for k in ("types", "uris", "suites", "components"))
            sources.append(AptSource(*map(tuple, fields), st.get("signed-by") or None, origin))
    return sources


def parse_one_line(text: str, origin: Path) -> list[AptSource]:
    """Entries of ``sources.list``-style lines: ``deb [opts] uri suite components...``."""
    sources = []
    for raw in text.splitlines():
        match = _ONE_LINE_RE.match(raw.split("#", 1)[0].strip())
        if match:
            kind, options, uri, suite, components = match.groups()
            opts = dict(o.split("=", 1) for o in (options or "").split() if "=" in o)
            comps = tuple(components.split())
            sources.append(
                AptSource((kind,), (uri,), (suite,), comps, opts.get("signed-by"), origin)
            )
    return sources


def read_apt_sources(
    sources_list: Path = SOURCES_LIST, sources_dir: Path = SOURCES_DIR
) -> list[AptSource]:
    """All enabled entries, in apt's reading order (apt ignores other file suffixes)."""
    files = [sources_list] if os.path.isfile(sources_list) else []
    if os.path.isdir(sources_dir):
        files += sorted(p for p in sources_dir.iterdir() if p.suffix in (".list", ".sources"))
    sources: list[AptSource] = []
    for path in files:
        parse = parse_deb822 if path.suffix == ".sources" else parse_one_line
        sources += parse(path.read_text(encoding="utf-8", errors="replace"), path)
    return sources


def release_origin(uri: str, suite: str, lists_dir: Path = APT_LISTS_DIR) -> str | None:
    """``Origin:`` of the Release file apt last fetched for ``uri``/``suite``, if any.

    Tells Debian's archive from third-party ``bookworm main`` repos without knowing hosts.
    """
    stem = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", uri).rstrip("/").replace("/", "_")
    for name in (f"{stem}_dists_{suite}_InRelease", f"{stem}_dists_{suite}_Release"):
        path = lists_dir / name
        text = path.read_text(encoding="utf-8", errors="replace") if os.path.isfile(path) else ""
        match = re.search(r"^Origin:\s*(.+?)\s*$", text, re.MULTILINE)
        if match:
            return match.group(1)
    return None


def debian_suite_source(
    sources: list[AptSource], codename: str, lists_dir: Path = APT_LISTS_DIR
) -> AptSource:
    """The entry of Debian's main archive for suite ``codename`` (not -security/-updates).

    Candidates are ``deb`` entries with exactly that suite and component ``main``; one
    confirmed by ``Origin: Debian`` wins, and known non-Debian origins are dropped.
    """
    ranked: list[tuple[bool, int, AptSource]] = []
    for src in sources:
        if "deb" in src.types and codename in src.suites and "main" in src.components:
            origins = {release_origin(uri, codename, lists_dir) for uri in src.uris}
            if origins <= {None, "Debian"}:
                ranked.append(("Debian" not in origins, len(ranked), src))
    if not ranked:
        raise InstallError(
            f"no enabled Debian 'deb' entry for suite '{codename}' with component 'main' in the "
            f"apt sources, so no mirror for {codename}-backports can be derived; add one "
            "yourself or use --method download"
        )
    return min(ranked)[2]


def ensure_backports_source(
    codename: str = "bookworm",
    sources_list: Path = SOURCES_LIST,
    sources_dir: Path = SOURCES_DIR,
    lists_dir: Path = APT_LISTS_DIR,
) -> Path | None:
    """Enable ``{codename}-backports`` on the machine's own Debian mirror and keyring.

    Does nothing if any entry already has that suite; returns the file written, if any.
    """
    suite = f"{codename}-backports"
    sources = read_apt_sources(sources_list, sources_dir)
    existing = [s for s in sources if suite in s.suites]
    if existing:
        print(f"apt: {suite} already enabled in {existing[0].origin}")
        return None
    base = debian_suite_source(sources, codename, lists_dir)
    lines = [
        "# Written by gvisor-magic install: Debian's own runsc is too old,",
        f"# the {suite} build works. Mirror and keyring copied from {base.origin}.",
        "Types: deb",
        f"URIs: {' '.join(base.uris)}",
        f"Suites: {suite}",
        "Components: main",
    ]
    if base.signed_by:  # an embedded key keeps its indented continuation lines
        lines += [line.rstrip() for line in f"Signed-By: {base.signed_by}".splitlines()]
    target = sources_dir / BACKPORTS_FILE_NAME
    tmp = target.with_name(f".{target.name}.tmp")  # apt ignores the .tmp suffix
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"apt: enabled {suite} in {target}")
    return target


def apt_get(*args: str) -> None:
    """Run apt-get non-interactively, echoing the command; failure -> InstallError."""
    cmd = ["apt-get", *args]
    print("+ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    status = subprocess.run(cmd, env=env, check=False).returncode
    if status != 0:
        raise InstallError(f"'{shlex.join(cmd)}' failed with exit status {status}")


def install_with_apt(os_release: dict[str, str], need_runsc: bool, need_uidmap: bool) -> None:
    """Install runsc (from backports on bookworm) and uidmap (for non-root users) via apt."""
    require_root("installing packages with apt-get")
    codename = os_release.get("VERSION_CODENAME", "")
    backports = need_runsc and os_release.get("ID") == "debian" and codename == "bookworm"
    if backports:
        ensure_backports_source(codename)  # before `update`; fails before changing anything
    apt_get("update")
    if need_uidmap:
        apt_get("install", "-y", "uidmap")
    if need_runsc:
        apt_get("install", "-y", *(["-t", f"{codename}-backports"] if backports else []), "runsc")
        version = runsc_version(Path("/usr/bin/runsc")) or "no working /usr/bin/runsc"
        if not is_usable_version(version):
            raise InstallError(
                f"apt installed an unusable runsc ({version}; releases before "
                f"{MIN_RELEASE_DATE} are broken); rerun with --method download"
            )
        print(f"installed /usr/bin/runsc: {version}")


def machine_arch(machine: str | None = None) -> str:
    """gVisor's release directory name for this CPU; unsupported CPUs are an error."""
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in ARCHES:
        raise InstallError(f"unsupported CPU {machine!r}: runsc is built for x86_64 and aarch64")
    return ARCHES[machine.lower()]


def parse_checksum(text: str) -> str:
    """The lowercase SHA-512 from a ``<128 hex>  runsc`` file; anything else is an error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    match = _CHECKSUM_RE.match(lines[0]) if lines else None
    if not match or match.group(2) not in (None, "runsc"):
        raise InstallError(f"unparseable checksum file (expected '<sha512>  runsc'): {text!r:.200}")
    return match.group(1).lower()


def fetch(url: str, out: BinaryIO) -> str:
    """Stream ``url`` into ``out``; return the body's SHA-512. Failures -> InstallError."""
    if not url.startswith(("http://", "https://")):
        raise InstallError(f"refusing non-HTTP(S) URL {url!r}")
    digest, total, next_report = hashlib.sha512(), 0, PROGRESS_STEP
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp:
            for chunk in iter(lambda: resp.read(1024 * 1024), b""):
                out.write(chunk)
                digest.update(chunk)
                total += len(chunk)
                if total >= next_report:  # sparse progress: a release is ~60 MiB
                    print(f"  {total >> 20} MiB", file=sys.stderr, flush=True)
                    next_report += PROGRESS_STEP
    except urllib.error.HTTPError as exc:
        raise InstallError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
        raise InstallError(f"download of {url} failed: {exc}") from None
    return digest.hexdigest()


def download_runsc(base_url: str, prefix: Path, arch: str) -> Path:
    """Download, verify and atomically install ``{prefix}/runsc``, failing closed.

    The binary goes to a temp file in ``prefix`` (so the final rename is atomic) that is
    deleted on any failure: bad or missing checksum, HTTP error, or an unusable version.
    """
    url = f"{base_url.rstrip('/')}/{arch}/runsc"
    if url.startswith("http://"):
        print(f"warning: {url} is plain HTTP; its checksum only guards against corruption")
    try:
        checksum_file = io.BytesIO()
        fetch(url + ".sha512", checksum_file)
        expected = parse_checksum(checksum_file.getvalue().decode("ascii", errors="replace"))
    except InstallError as exc:
        raise InstallError(f"cannot verify runsc: {exc}; nothing installed") from None
    target = prefix / "runsc"
    fd, tmp_name = tempfile.mkstemp(prefix=".runsc.", suffix=".download", dir=prefix)
    tmp = Path(tmp_name)
    try:
        print(f"downloading {url}", flush=True)
        with os.fdopen(fd, "wb") as out:
            actual = fetch(url, out)
            out.flush()
            os.fsync(out.fileno())
        if not hmac.compare_digest(actual, expected):
            raise InstallError(f"SHA-512 mismatch for {url}: expected {expected}, got {actual}")
        os.chmod(tmp, 0o755)
        version = runsc_version(tmp)
        if version is None or not is_usable_version(version):
            raise InstallError(f"downloaded runsc is unusable ({version})")
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, InstallError):
            raise InstallError(f"{exc}; nothing installed") from None
        raise
    version = runsc_version(target)
    if version is None:
        raise InstallError(f"installed {target}, but '{target} --version' failed")
    print(f"installed {target}: {version}")
    return target


def check(prefix: Path) -> int:
    """Report runsc, newuidmap and root status without changing anything; 0 iff usable."""
    found = find_runsc((prefix,))
    versions = {path: runsc_version(path) for path in found}
    for path, version in versions.items():
        state = "usable" if version and is_usable_version(version) else "UNUSABLE"
        print(f"runsc: {path}: {version or 'runsc --version failed'} [{state}]")
    usable = bool(found) and is_usable_version(versions[found[0]] or "")
    where = found[0] if found else f"none found in {prefix}, PATH, /usr/local/bin, /usr/bin"
    print(f"selected runsc: {where} [{'usable' if usable else 'NOT usable'}]")
    print(f"(releases before {MIN_RELEASE_DATE} are too old for gvisor_magic)")
    newuidmap = shutil.which("newuidmap")
    print(f"newuidmap: {newuidmap or 'missing (install uidmap; needed for non-root users)'}")
    print(
        f"root: {'yes' if os.geteuid() == 0 else 'no (fine for --check and a writable --prefix)'}"
    )
    return 0 if usable else 1


def runsc_candidates(method: str, prefix: Path) -> list[Path]:
    """The download method owns only {prefix}/runsc; apt cares about what PATH would pick up."""
    return [prefix / "runsc"] if method == "download" else find_runsc((prefix,))


def install(args: argparse.Namespace) -> int:
    """Make sure a usable runsc is installed, doing nothing if one already is."""
    os_release = read_os_release()
    method = choose_method(args.method, os_release)
    prefix: Path = args.prefix
    found = runsc_candidates(method, prefix)
    version = runsc_version(found[0]) if found else None
    need_runsc = not (version and is_usable_version(version))
    need_uidmap = method == "apt" and shutil.which("newuidmap") is None
    if not need_runsc:
        print(f"runsc already usable: {found[0]}: {version}")
    if not need_runsc and not need_uidmap:
        print("nothing to do")
        return 0
    print(f"installing with method '{method}'")
    if method == "apt":
        install_with_apt(os_release, need_runsc, need_uidmap)
        first = find_runsc((prefix,))[0]
        if not is_usable_version(runsc_version(first) or ""):
            raise InstallError(f"{first} is unusable and shadows /usr/bin/runsc; remove it")
        return 0
    arch = machine_arch()
    with contextlib.suppress(OSError):  # any problem is reported just below
        prefix.mkdir(parents=True, exist_ok=True)
    if not (os.path.isdir(prefix) and os.access(prefix, os.W_OK | os.X_OK)):
        require_root(f"writing to {prefix}")
        raise InstallError(f"--prefix {prefix} is not a writable directory")
    download_runsc(args.base_url, prefix, arch)
    if shutil.which("newuidmap") is None:
        print("note: newuidmap is missing; install the uidmap package for non-root users")
    return 0


def install_docker(args: argparse.Namespace) -> int:
    """``--docker``: ensure runsc exactly as a plain run does, then register that very binary.

    dockerd gets an absolute path: its own PATH (a systemd unit's) may not find runsc.
    """
    install(args)
    found = runsc_candidates(choose_method(args.method, read_os_release()), args.prefix)
    if not found or not is_usable_version(runsc_version(found[0]) or ""):
        raise InstallError("no usable runsc after installing; see --check")
    return docker_runtime.setup_docker(
        os.path.abspath(found[0]),
        args.daemon_json or docker_runtime.DAEMON_JSON,
        args.runtime_name or docker_runtime.DEFAULT_RUNTIME_NAME,
        reload=not args.no_reload,
    )


def check_all(args: argparse.Namespace) -> int:
    """``--check`` (plus Docker with ``--docker``): every part reports; 0 iff all are fine."""
    status = check(args.prefix)
    if args.docker:
        name = args.runtime_name or docker_runtime.DEFAULT_RUNTIME_NAME
        status = max(status, docker_runtime.check_docker(name, exact=bool(args.runtime_name)))
    return status


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The CLI; each action is its own option so later ones (e.g. --docker) slot in."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--check", action="store_true", help="only report; exit 0 iff a usable runsc is found")
    add(
        "--method",
        choices=("auto", "apt", "download"),
        default="auto",
        help="auto (default): apt on Debian/Ubuntu, else download the official release",
    )
    add(
        "--base-url",
        default=os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
        help=f"release directory for downloads (env {BASE_URL_ENV}; default {DEFAULT_BASE_URL})",
    )
    add(
        "--prefix",
        type=Path,
        default=DEFAULT_PREFIX,
        help=f"where --method download installs runsc (default {DEFAULT_PREFIX})",
    )
    add(
        "--docker",
        action="store_true",
        help="also register runsc as a Docker runtime and reload dockerd; with --check, check "
        "that Docker runs a container under it",
    )
    add(
        "--daemon-json",
        type=Path,
        help=f"with --docker: the dockerd config to edit (default {docker_runtime.DAEMON_JSON})",
    )
    add(
        "--runtime-name",
        help=f"with --docker: the runtime's name (default {docker_runtime.DEFAULT_RUNTIME_NAME}; "
        "--check then also accepts any runtime whose path ends in runsc)",
    )
    add(
        "--no-reload",
        action="store_true",
        help="with --docker: only edit the file; do not signal or query dockerd (for tests)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point: an InstallError becomes its message on stderr and its exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    docker_only = {"--daemon-json": args.daemon_json, "--runtime-name": args.runtime_name,
                   "--no-reload": args.no_reload}
    if not args.docker and any(v is not None and v is not False for v in docker_only.values()):
        parser.error(f"{', '.join(k for k, v in docker_only.items() if v)}: only with --docker")
    if args.check and (args.daemon_json or args.no_reload):
        parser.error("--check --docker only reads dockerd's state: drop --daemon-json/--no-reload")
    try:
        if args.check:
            return check_all(args)
        return install_docker(args) if args.docker else install(args)
    except (InstallError, docker_runtime.DockerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
