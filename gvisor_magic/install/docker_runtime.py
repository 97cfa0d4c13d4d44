"""Register gVisor's runsc as a Docker runtime, and check that Docker can use it.

Used by ``gvisor-magic install --docker`` (stdlib only, Python >= 3.9). Talks to dockerd over
its unix socket with ``http.client`` so that no Docker SDK or CLI is needed.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import io
import json
import os
import shlex
import signal
import socket
import sys
import tarfile
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

DAEMON_JSON = Path("/etc/docker/daemon.json")
DOCKER_SOCKET = "/var/run/docker.sock"
DOCKER_PID_FILE = Path("/var/run/docker.pid")
PROC = Path("/proc")
DEFAULT_RUNTIME_NAME = "runsc"
# Without it runsc refuses to start under dockerd here: "cannot run with network enabled in
# root network namespace". gvisor_magic never needs networking inside the sandbox.
NETWORK_NONE = "--network=none"
# With directfs on, runsc 20240729 truncates a host file on a read-only bind mount
# when the sandbox opens it with O_TRUNC; through the gofer, read-only holds.
DIRECTFS_OFF = "--directfs=false"
REQUIRED_ARGS = (NETWORK_NONE, DIRECTFS_OFF)
# dockerd refuses config entries that shadow its built-in runtimes.
RESERVED_NAMES = ("runc", "io.containerd.runc.v2", "io.containerd.runtime.v1.linux")
PROBE_IMAGE = "gvisor-magic/scratch:latest"
PROBE_BINDS = ("/usr", "/lib", "/lib64", "/bin")
PROBE_COMMAND = ("/bin/uname", "-r")
GVISOR_KERNEL = "4.4.0"  # what gVisor's Sentry reports as its kernel release
RELOAD_TIMEOUT = 10.0
API_TIMEOUT = 30.0
PROBE_TIMEOUT = 60.0
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


class DockerError(Exception):
    """A failure shown to the user as one message; ``exit_code`` 2 means "rerun as root"."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ProbeImageMissing(DockerError):
    """The probe's image is not on the daemon, and this run may not create it (``--check``)."""

    def __init__(self, image: str) -> None:
        super().__init__(f"image {image} is not on the daemon")
        self.image = image


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), "a number")


def sudo_hint() -> str:
    """The command line that reruns this script as root."""
    return "sudo " + shlex.join(["python3", *sys.argv])


# --- daemon.json -------------------------------------------------------------------------------


def load_daemon_config(path: Path) -> tuple[dict[str, Any], bytes | None]:
    """The parsed file and its exact bytes; absent gives ({}, None), empty/blank gives {}.

    Anything dockerd itself would reject is an error here too, before anything is written.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        raise DockerError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DockerError(f"{path} is not UTF-8 (byte {exc.start}); left it unchanged") from None
    if not text.strip():
        return {}, raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DockerError(
            f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
            "left it unchanged: fix it (dockerd cannot start with it either) and rerun"
        ) from None
    if not isinstance(data, dict):
        raise DockerError(
            f"{path}: the top level is {_json_type(data)}, but dockerd expects a JSON object "
            "({...}); left it unchanged"
        )
    return data, raw


def merged_runtime(entry: object, runtime_path: str, where: str) -> dict[str, Any]:
    """``entry`` pointing at ``runtime_path`` with ``REQUIRED_ARGS``; other keys/args kept.

    A different ``--network=`` or ``--directfs=`` value is dropped rather than left to
    fight with ours.
    """
    if entry is None:
        return {"path": runtime_path, "runtimeArgs": list(REQUIRED_ARGS)}
    if not isinstance(entry, dict):
        raise DockerError(f"{where} is {_json_type(entry)}, not an object; left it unchanged")
    args = entry.get("runtimeArgs", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise DockerError(f"{where}.runtimeArgs is not a list of strings; left it unchanged")
    dropped = [a for a in args if a.split("=")[0] in ("--network", "--directfs")
               and a not in REQUIRED_ARGS]
    if dropped:
        print(f"note: replacing {' '.join(dropped)} with {' '.join(REQUIRED_ARGS)} in {where}")
    kept = [a for a in args if a not in dropped]
    return {
        **entry,
        "path": runtime_path,
        "runtimeArgs": [*kept, *(a for a in REQUIRED_ARGS if a not in kept)],
    }


def backup_path(path: Path) -> Path:
    """``daemon.json.bak-<UTC timestamp>``, numbered if a backup from this second exists."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    number = 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{number}")
        number += 1
    return candidate


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` via a temp file in its directory, so dockerd never reads half a file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def register_runtime(
    daemon_json: Path, runtime_path: str, name: str = DEFAULT_RUNTIME_NAME
) -> bool:
    """Set ``runtimes.<name>`` in ``daemon_json``, keeping everything else; True if changed.

    Nothing is written (no backup either) when the file already says what we want. A
    changed existing file is first copied to a timestamped backup, keeping its mode.
    """
    if name in RESERVED_NAMES or not name.strip():
        why = "is reserved by dockerd" if name.strip() else "is empty"
        raise DockerError(f"runtime name {name!r} {why}; pick another")
    target = Path(os.path.realpath(daemon_json))  # a symlinked daemon.json stays a symlink
    data, raw = load_daemon_config(target)
    runtimes = data.get("runtimes", {})
    if not isinstance(runtimes, dict):
        raise DockerError(
            f"{target}: 'runtimes' is {_json_type(runtimes)}, not an object; left it unchanged"
        )
    entry = merged_runtime(runtimes.get(name), runtime_path, f"{target}: runtimes.{name}")
    if runtimes.get(name) == entry:
        print(f"docker: runtime '{name}' already registered in {target}: {json.dumps(entry)}")
        return False
    new = {**data, "runtimes": {**runtimes, name: entry}}
    body = (json.dumps(new, indent=2) + "\n").encode("utf-8")
    try:
        if raw is None:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            mode = 0o644
        else:
            mode = os.stat(target).st_mode & 0o7777
            backup = backup_path(target)
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(raw)
            print(f"docker: backed up {target} to {backup}")
        write_atomically(target, body, mode)
    except PermissionError as exc:
        raise DockerError(f"writing {exc.filename} needs root; rerun: {sudo_hint()}", 2) from None
    except OSError as exc:
        raise DockerError(f"cannot write {exc.filename or target}: {exc.strerror}") from None
    print(f"docker: registered runtime '{name}' in {target}: {json.dumps(entry)}")
    return True


# --- the dockerd process -----------------------------------------------------------------------


def process_name(pid: int, proc: Path = PROC) -> str | None:
    """The kernel's name for ``pid`` (``comm``), or None if it does not exist."""
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def dockerd_pids(pid_file: Path = DOCKER_PID_FILE, proc: Path = PROC) -> list[int]:
    """Running dockerd processes: the pid file's if it is one (pid files go stale), else a
    scan of /proc (dockerd started by hand with ``--pidfile ""`` writes none)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        if process_name(pid, proc) == "dockerd":
            return [pid]
    pids = (int(p.name) for p in proc.iterdir() if p.name.isdigit())
    return sorted(pid for pid in pids if process_name(pid, proc) == "dockerd")


def dockerd_config_file(pid: int, proc: Path = PROC) -> Path:
    """The daemon.json that dockerd ``pid`` re-reads on SIGHUP (its ``--config-file``)."""
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        args = []
    for i, arg in enumerate(args):
        if arg == "--config-file" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--config-file="):
            return Path(arg.split("=", 1)[1])
    return DAEMON_JSON


def reload_dockerd(pids: list[int]) -> None:
    """SIGHUP makes dockerd re-read daemon.json's ``runtimes`` without restarting containers."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            print(f"docker: dockerd (pid {pid}) exited before it could be reloaded")
        except PermissionError:
            message = f"signalling dockerd (pid {pid}) needs root; rerun: {sudo_hint()}"
            raise DockerError(message, 2) from None
        else:
            print(f"docker: sent SIGHUP to dockerd (pid {pid}) to reload its runtimes")


# --- the Docker API over the unix socket -------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to dockerd's unix socket; the host name only fills the Host header."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def docker_api(
    method: str,
    path: str,
    body: object = None,
    *,
    socket_path: str = DOCKER_SOCKET,
    timeout: float = API_TIMEOUT,
    step: str = "",
    ok: tuple[int, ...] = (200, 201, 204, 304),
) -> tuple[int, bytes]:
    """One API call; dicts go as JSON, bytes as a tar. Statuses not in ``ok`` are errors
    carrying dockerd's own message, prefixed with ``step`` so the report says what failed."""
    what = f"{step or method + ' ' + path}: "
    headers = {}
    if isinstance(body, (bytes, bytearray)):
        headers["Content-Type"] = "application/x-tar"
    elif body is not None:
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
    except FileNotFoundError:
        raise DockerError(f"{what}no Docker socket at {socket_path}") from None
    except PermissionError:
        message = f"{what}no permission to use {socket_path} (need root or group docker)"
        raise DockerError(message) from None
    except (OSError, http.client.HTTPException) as exc:
        raise DockerError(f"{what}cannot talk to dockerd at {socket_path}: {exc!r}") from None
    finally:
        conn.close()
    if status not in ok:
        try:
            message = json.loads(data)["message"]
        except (ValueError, KeyError, TypeError):
            message = data.decode(errors="replace").strip()
        raise DockerError(f"{what}HTTP {status}: {message}")
    return status, data


def docker_info(socket_path: str = DOCKER_SOCKET) -> dict[str, Any]:
    """``GET /info``: the daemon's view, including the runtimes it loaded."""
    data = docker_api("GET", "/info", socket_path=socket_path, step="GET /info")[1]
    return json.loads(data)


def wait_for_runtime(
    name: str, runtime_path: str, socket_path: str = DOCKER_SOCKET, timeout: float = RELOAD_TIMEOUT
) -> dict[str, Any]:
    """Poll ``/info`` until dockerd lists ``name`` as we registered it; a reload is async."""
    deadline, seen = time.monotonic() + timeout, "nothing"
    while True:
        try:
            entry = (docker_info(socket_path).get("Runtimes") or {}).get(name)
            seen = json.dumps(entry) if entry else f"no runtime named '{name}'"
            args = (entry or {}).get("runtimeArgs") or []
            if entry and entry.get("path") == runtime_path and all(
                    a in args for a in REQUIRED_ARGS):
                return entry
        except DockerError as exc:
            seen = str(exc)
        if time.monotonic() >= deadline:
            raise DockerError(
                f"dockerd did not list runtime '{name}' ({runtime_path} {' '.join(REQUIRED_ARGS)}) "
                "within "
                f"{timeout:.0f} s of the reload (last seen: {seen}); dockerd's log says why "
                "(journalctl -u docker, or wherever its output goes)"
            )
        time.sleep(0.25)


def setup_docker(
    runtime_path: str,
    daemon_json: Path = DAEMON_JSON,
    name: str = DEFAULT_RUNTIME_NAME,
    reload: bool = True,
    socket_path: str = DOCKER_SOCKET,
    pid_file: Path = DOCKER_PID_FILE,
) -> int:
    """``--docker``: register the runtime, reload dockerd if it runs, verify it via the API.

    The reload is skipped when the file was unchanged and dockerd already lists the runtime.
    """
    changed = register_runtime(daemon_json, runtime_path, name)
    if not reload:
        print("docker: not reloading dockerd (--no-reload)")
        return 0
    pids = dockerd_pids(pid_file)
    if not pids:
        print(f"docker: dockerd is not running; it offers runtime '{name}' once it starts")
        return 0
    real = os.path.realpath(daemon_json)
    mine = [pid for pid in pids if os.path.realpath(dockerd_config_file(pid)) == real]
    for pid in sorted(set(pids) - set(mine)):
        print(f"docker: dockerd (pid {pid}) reads {dockerd_config_file(pid)}, not {real}; "
              "leaving it alone")
    if not mine:
        return 0
    if not changed:
        with contextlib.suppress(DockerError):
            entry = wait_for_runtime(name, runtime_path, socket_path, timeout=0)
            print(f"docker: dockerd already offers runtime '{name}': {json.dumps(entry)}")
            return 0
        print(f"docker: dockerd has not loaded runtime '{name}' from {real} yet")
    reload_dockerd(mine)
    entry = wait_for_runtime(name, runtime_path, socket_path)
    print(f"docker: dockerd now offers runtime '{name}': {json.dumps(entry)}")
    return 0


# --- --check --docker --------------------------------------------------------------------------


def find_registered_runtime(
    runtimes: dict[str, Any], name: str, exact: bool
) -> tuple[str, dict[str, Any]] | None:
    """``name`` if dockerd has it; unless ``exact``, else any runtime whose path is a runsc
    (preferring one with ``--network=none``), since people also call it e.g. ``gvisor``."""
    if isinstance(runtimes.get(name), dict):
        return name, runtimes[name]
    if exact:
        return None
    found = [
        (not all(a in (entry.get("runtimeArgs") or []) for a in REQUIRED_ARGS), key, entry)
        for key, entry in runtimes.items()
        if isinstance(entry, dict) and str(entry.get("path", "")).endswith("runsc")
    ]
    return min(found, key=lambda item: item[:2])[1:] if found else None


def demux_logs(raw: bytes) -> str:
    """Container output without Docker's framing (8-byte header: stream, 0, 0, 0, size).

    Output that is not framed (a TTY container) is returned as is.
    """
    out, pos = bytearray(), 0
    while pos + 8 <= len(raw) and raw[pos] in (0, 1, 2) and raw[pos + 1 : pos + 4] == b"\0\0\0":
        size = int.from_bytes(raw[pos + 4 : pos + 8], "big")
        out += raw[pos + 8 : pos + 8 + size]
        pos += 8 + size
    return (bytes(out) if pos == len(raw) else raw).decode("utf-8", errors="replace")


def has_image(image: str, socket_path: str = DOCKER_SOCKET) -> bool:
    """Whether the daemon has ``image`` (a lookup only: nothing is pulled or created)."""
    quoted = urllib.parse.quote(image, safe="/:")
    status, _ = docker_api(
        "GET", f"/images/{quoted}/json", socket_path=socket_path, ok=(200, 404),
        step=f"looking up image {image}",
    )
    return status == 200


def create_image_command(image: str = PROBE_IMAGE) -> str:
    """The shell command that makes the empty ``image`` (what ``ensure_probe_image`` does)."""
    return f"tar -cf - -T /dev/null | docker import - {shlex.quote(image)}"


def ensure_probe_image(image: str = PROBE_IMAGE, socket_path: str = DOCKER_SOCKET) -> None:
    """Create the empty ``image`` from an empty tar if missing: there is no registry here,
    and the probe bind-mounts the host's own tools anyway."""
    if has_image(image, socket_path):
        return
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    query = urllib.parse.urlencode({"fromSrc": "-", "repo": repo, "tag": tag or "latest"})
    empty_tar = io.BytesIO()
    tarfile.open(fileobj=empty_tar, mode="w").close()
    step = f"creating the empty image {image}"
    print(f"docker: image {image} is missing; creating it (empty, from an empty tar)")
    data = docker_api(
        "POST", f"/images/create?{query}", empty_tar.getvalue(), socket_path=socket_path, step=step
    )[1]
    for line in data.decode(errors="replace").splitlines():  # errors come inside a 200 stream
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "error" in event:
            raise DockerError(f"{step}: {event['error']}")


def probe_container(
    runtime: str, image: str = PROBE_IMAGE, socket_path: str = DOCKER_SOCKET,
    create_image: bool = True,
) -> str:
    """Output of ``uname -r`` in a real container under ``runtime``; failures name the step.

    No network, read-only root, host tools bind-mounted read-only; the container is removed
    whatever happens. A missing ``image`` is created (empty), unless ``create_image`` is
    false: then ``ProbeImageMissing`` is raised and nothing was created.
    """
    if create_image:
        ensure_probe_image(image, socket_path)
    elif not has_image(image, socket_path):
        raise ProbeImageMissing(image)
    binds = [f"{d}:{d}:ro" for d in PROBE_BINDS if os.path.isdir(d)]
    spec = {
        "Image": image,
        "Cmd": list(PROBE_COMMAND),
        "Labels": {"gvisor-magic.probe": "docker-check"},
        "HostConfig": {
            "Runtime": runtime,
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "Binds": binds,
            "AutoRemove": False,
        },
    }
    api = {"socket_path": socket_path}
    created = docker_api(
        "POST", "/containers/create", spec, **api, step="creating the probe container"
    )[1]
    cid = json.loads(created)["Id"]
    try:
        docker_api("POST", f"/containers/{cid}/start", **api, step="starting the probe container")
        waited = docker_api(
            "POST", f"/containers/{cid}/wait", **api, timeout=PROBE_TIMEOUT,
            step="waiting for the probe container",
        )[1]
        logs = docker_api(
            "GET", f"/containers/{cid}/logs?stdout=1&stderr=1", **api,
            step="reading the probe's output",
        )[1]
    finally:
        try:
            docker_api("DELETE", f"/containers/{cid}?force=1&v=1", **api, ok=(200, 204, 404))
        except DockerError as exc:
            print(f"warning: probe container {cid[:12]} not removed ({exc}); "
                  f"remove it: docker rm -f {cid[:12]}", file=sys.stderr)
    output, code = demux_logs(logs).strip(), json.loads(waited).get("StatusCode")
    if code != 0:
        raise DockerError(f"the probe container exited with status {code}; output: {output!r}")
    return output


def check_docker(
    name: str = DEFAULT_RUNTIME_NAME,
    exact: bool = False,
    socket_path: str = DOCKER_SOCKET,
    image: str = PROBE_IMAGE,
) -> int:
    """``--check --docker``: daemon reachable, runtime registered with ``--network=none``, and a
    real container runs under it (gVisor's kernel answers ``uname -r``); 0 iff all hold.

    It changes nothing: without the probe's ``image`` on the daemon it says what would be
    created, that the container could not be run without it, and returns 1 (not checked).
    """
    setup = "sudo python3 scripts/install_gvisor.py --docker" + (
        f" --runtime-name {shlex.quote(name)}" if exact else ""
    )
    try:
        info = docker_info(socket_path)
    except DockerError as exc:
        print(f"docker daemon: NOT reachable: {exc}")
        print("  fix: start dockerd (systemctl start docker), or run as root / group docker")
        return 1
    print(f"docker daemon: reachable at {socket_path} (Docker {info.get('ServerVersion')})")
    runtimes = info.get("Runtimes") or {}
    found = find_registered_runtime(runtimes, name, exact)
    if found is None:
        wanted = f"'{name}'" + ("" if exact else " (nor any runtime whose path ends in runsc)")
        print(f"docker runtime: NOT registered: no runtime {wanted}; dockerd has: "
              f"{', '.join(sorted(runtimes)) or 'none'}")
        print(f"  fix: {setup}")
        return 1
    rname, entry = found
    args = entry.get("runtimeArgs") or []
    print(f"docker runtime: '{rname}' -> {entry.get('path')} {' '.join(args)}".rstrip())
    if NETWORK_NONE not in args:
        print(f"docker runtime: MISSING {NETWORK_NONE} (runsc cannot start under dockerd "
              "without it); probe not attempted")
        print(f"  fix: {setup}")
        return 1
    if DIRECTFS_OFF not in args:
        print(f"docker runtime: MISSING {DIRECTFS_OFF} (with directfs, read-only mounts do not "
              "hold: O_TRUNC truncates the host file); probe not attempted")
        print(f"  fix: {setup}")
        return 1
    reproduce = shlex.join([
        "docker", "run", "--rm", f"--runtime={rname}", "--network=none", "--read-only",
        *(f"-v{d}:{d}:ro" for d in PROBE_BINDS if os.path.isdir(d)), image, *PROBE_COMMAND,
    ])
    try:
        output = probe_container(rname, image, socket_path, create_image=False)
    except ProbeImageMissing:
        print(f"docker probe: NOT RUN: the probe's image {image} is not on the daemon, and "
              "--check changes nothing, so it was not created; without an image no container "
              f"can run, so whether Docker runs one under runtime '{rname}' is unknown")
        print(f"  fix: create it (empty, from an empty tar; gvisor-magic's Docker backend also "
              f"creates it on its first run): {create_image_command(image)}; then check again")
        return 1
    except DockerError as exc:
        print(f"docker probe: FAILED: {exc}")
        print(f"  fix: see the error above; reproduce with: {reproduce}")
        return 1
    if output != GVISOR_KERNEL:
        print(f"docker probe: FAILED: 'uname -r' printed {output!r}, not gVisor's "
              f"{GVISOR_KERNEL!r}, so runtime '{rname}' is not gVisor")
        print(f"  fix: point it at runsc: {setup}")
        return 1
    print(f"docker probe: 'uname -r' in a container under runtime '{rname}' printed "
          f"{output} (gVisor's kernel) [works]")
    return 0
