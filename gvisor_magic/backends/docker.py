"""Run commands in Docker containers under the runsc runtime, through the docker SDK.

Same sandbox policy as the runsc backend (``layout.py``): an empty local image
with the host's system directories bound read-only, the working directory
read-write, no network, no capabilities, the caller's uid/gid, a private
``/tmp``. Docker adds what it is good at: cgroup limits on memory, pids and
CPU, and ``--rm`` semantics enforced by the daemon even if the client dies.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
import time

import psutil

from ..changes import start_stamp
from ..egress.policy import NetworkPolicy
from ..egress.sandbox import relay_attempts, relay_setting
from ..errors import CommandInterrupted, SandboxStartError
from ..install import command as install_command
from ..memory import ContainerOOMWatch
from ..process import OutputCallback, kill_processes_mentioning, supervise
from ..registry import Enforcement
from ..request import CommandRequest, SandboxSpec
from ..result import CommandResult, returncode_of
from ..run_dirs import make_run_dir
from ..writes import take_held_writes, with_writes
from .base import BackendStatus
from .docker_process import DockerProcess
from .init import init_argv, read_attempts, read_status, started_in
from .layout import (
    LAYER_CAPABILITIES,
    Identity,
    SandboxLayout,
    build_layout,
    caller_identity,
    layer_setting,
)

log = logging.getLogger("gvisor_magic")

ENV_IMAGE = "GVISOR_MAGIC_IMAGE"
ENV_RUNTIME = "GVISOR_MAGIC_DOCKER_RUNTIME"
LABEL = "io.github.gvisor-magic"
RUNTIME_CACHE_SECONDS = 30.0
REGISTER_HINT = f"register runsc with Docker: {install_command('--docker')}"
#: Exit status when the container runtime itself failed (as ``docker run`` uses it).


class DockerBackend:
    """gVisor through Docker's runsc runtime: one auto-removed container per command."""

    name = "docker"
    isolated = True

    def __init__(self, image: str | None = None, runtime: str | None = None) -> None:
        self._image = image or os.environ.get(ENV_IMAGE) or None
        self._runtime = runtime or os.environ.get(ENV_RUNTIME) or None
        self._client = None
        self._lock = threading.Lock()
        # The daemon's runtime table and our image change rarely; asking for them on
        # every command costs three API round trips. A failed command clears both.
        self._runtime_cache: tuple[float, str, dict] | None = None
        self._image_ready: str | None = None

    @staticmethod
    def enforcement() -> Enforcement:
        return Enforcement(
            memory="container cgroup", cpus="container cgroup",
            summary="the same rlimits (as Docker ulimits, enforced by gVisor) and tmpfs caps, "
                    "plus cgroups: memory (+swap) and cpus for the whole container, and pids "
                    "(2 x processes + 256, since gVisor's own threads and per-process stubs "
                    "count there too)",
            network="off only: the runtime runs with --network=none and without --host-uds, "
                    "so allowlists, network=True and 'host' are refused (use runsc)")

    @property
    def custom_image(self) -> str | None:
        """The image given by ``GVISOR_MAGIC_IMAGE`` (or the constructor), if any."""
        return self._image

    # -- the daemon -----------------------------------------------------------

    def client(self):
        """A docker SDK client, created on first use (raises ``DockerException``)."""
        import docker

        with self._lock:
            if self._client is None:
                self._client = docker.from_env(timeout=30)
            return self._client

    def find_runtime(self) -> tuple[str, dict]:
        """(name, config) of the daemon's runsc runtime; raises SandboxStartError if none."""
        cached = self._runtime_cache
        if cached is not None and time.monotonic() - cached[0] < RUNTIME_CACHE_SECONDS:
            return cached[1], cached[2]
        name, config = self._lookup_runtime()
        self._runtime_cache = (time.monotonic(), name, config)
        return name, config

    def forget(self) -> None:
        self._runtime_cache = None
        self._image_ready = None

    def _lookup_runtime(self) -> tuple[str, dict]:
        try:
            client = self.client()
            client.ping()
            runtimes = client.info().get("Runtimes") or {}
        except Exception as exc:  # the SDK raises several unrelated types here
            denied = "permission denied" in str(exc).lower() or any(
                isinstance(e, PermissionError) for e in (exc, exc.__cause__, exc.__context__))
            fix = ("this user may not use the Docker socket: add it to the 'docker' group (which "
                   "is root-equivalent), or use the runsc backend" if denied else
                   "start the Docker daemon, or use the runsc backend")
            raise SandboxStartError(self.name, f"Docker daemon not reachable: {exc}",
                                    fix=fix) from exc
        if self._runtime:
            if self._runtime not in runtimes:
                raise SandboxStartError(self.name, f"Docker has no runtime named "
                                        f"{self._runtime!r} (it has {', '.join(runtimes)})",
                                        fix=REGISTER_HINT)
            return self._runtime, self._checked(self._runtime, runtimes[self._runtime] or {})
        for name, config in runtimes.items():
            path = str((config or {}).get("path", ""))
            if name == "runsc" or os.path.basename(path) == "runsc":
                return name, self._checked(name, config or {})
        raise SandboxStartError(self.name, "Docker has no runsc runtime (runtimes: "
                                f"{', '.join(runtimes) or 'none'})", fix=REGISTER_HINT)

    def _checked(self, name: str, config: dict) -> dict:
        """Refuse a runtime whose read-only mounts do not hold.

        With directfs on, runsc (20240729, and we know of no fixed release)
        truncates a host file on a read-only bind mount when the sandbox opens
        it with O_TRUNC. Read-only must mean read-only, so we require the
        runtime to be registered with --directfs=false, as the installer does.
        """
        args = config.get("runtimeArgs") or []
        if "--directfs=false" not in args:
            raise SandboxStartError(
                self.name, f"the Docker runtime {name!r} runs with directfs on, which lets a "
                "sandbox truncate files on read-only mounts; register it with "
                "--directfs=false", fix=REGISTER_HINT)
        return config

    def image(self) -> str:
        if self._image:
            return self._image
        if self._image_ready is None:
            from .docker_image import ensure_scratch_image

            self._image_ready = ensure_scratch_image(self.client())
        return self._image_ready

    # -- probing --------------------------------------------------------------

    def probe(self) -> BackendStatus:
        self.forget()
        try:
            runtime, config = self.find_runtime()
            version = self.client().version().get("Version")
        except SandboxStartError as exc:
            return BackendStatus(self.name, False, True, exc.reason, fix=exc.fix)
        details = {"runtime": runtime, "runtime_path": str(config.get("path", "")),
                   "runtime_args": " ".join(config.get("runtimeArgs") or [])}
        probe = CommandRequest.build(["uname", "-r"], timeout=60)
        try:
            result = self.run(probe)
        except SandboxStartError as exc:
            return BackendStatus(self.name, False, True, f"container failed to start: "
                                 f"{exc.reason}", fix=exc.fix, version=version,
                                 details=details)
        if not result.success:
            return BackendStatus(self.name, False, True, "probe command failed in the container "
                                 f"(exit {result.returncode}): {result.stderr.strip()[-300:]}",
                                 version=version, details=details)
        details["sandbox_kernel"] = result.stdout.strip()
        return BackendStatus(self.name, True, True,
                             f"a probe command ran in a container under runtime {runtime!r}",
                             version=f"Docker {version}", details=details)

    # -- running --------------------------------------------------------------

    def run(self, request: CommandRequest, on_output: OutputCallback | None = None
            ) -> CommandResult:
        runtime, config = self.find_runtime()
        self.check_network(request.network, runtime, config)
        self.check_kernel_dir(request.spec)
        try:
            image = self.image()
        except Exception as exc:
            raise SandboxStartError(self.name, f"cannot prepare the image: {exc}") from exc
        note = None
        if self._image and request.spec.holds_writes and request.spec.writes is None:
            # An image of one's own runs no init of ours: nothing can hold the writes.
            request = request.with_spec(writes="direct")
            note = ("direct: an image of its own (GVISOR_MAGIC_IMAGE) cannot hold writes (the "
                    "default, 'auto', holds them with the host's system image)")
        scratch = make_run_dir(tempfile.gettempdir())  # named after us: reaped if we die
        try:
            result = self._run(request, on_output, runtime, image, scratch)
            if note:
                result.details["writes"] = note
            return result
        except SandboxStartError:
            self.forget()  # the daemon may have changed under us: look again next time
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def check_network(self, policy: NetworkPolicy, runtime: str, config: dict) -> None:
        """Docker's sandboxes have no network: the runtime is registered with
        ``--network=none`` and without ``--host-uds``, so neither the host's network nor
        the host's filtering proxy can be given to them. Anything but "off" is refused
        (never run with less, or more, than asked)."""
        if not policy.enabled:
            return
        if policy.proxied:
            raise SandboxStartError(
                self.name, f"network {policy.describe()!r} needs the host's filtering proxy, "
                f"which Docker's runtime {runtime!r} cannot reach (runsc runs there without "
                "--host-uds)", fix="use the runsc backend (mode='runsc') for network "
                "allowlists and network=True", unsupported=True)
        if "--network=none" in (config.get("runtimeArgs") or []):
            raise SandboxStartError(self.name, f"the Docker runtime {runtime!r} is registered "
                                    "with --network=none, so network='host' cannot work "
                                    "with it", fix="use the runsc backend for network='host'",
                                    unsupported=True)

    def check_kernel_dir(self, spec: SandboxSpec) -> None:
        """A ``kernel_dir`` needs ``--host-uds=create``, which Docker's runtime lacks."""
        if spec.kernel_dir is not None:
            raise SandboxStartError(self.name, "a gVisor kernel's sockets need runsc's "
                                    "--host-uds=create, which the Docker runtime does not have",
                                    fix="use the runsc backend (mode='runsc')",
                                    unsupported=True)

    def _run(self, request: CommandRequest, on_output: OutputCallback | None, runtime: str,
             image: str, scratch: str) -> CommandResult:
        host_system = not self._image
        status_dir = os.path.join(scratch, "status")
        os.mkdir(status_dir, 0o700)
        layout = build_layout(request.spec, request.env, docker_identity(), scratch,
                              host_system=host_system,
                              status_dir=status_dir if host_system else None)
        try:
            return self._run_container(request, on_output, runtime, image, layout, status_dir,
                                       host_system)
        finally:
            layout.release()

    def _run_container(self, request: CommandRequest, on_output: OutputCallback | None,
                       runtime: str, image: str, layout: SandboxLayout, status_dir: str,
                       host_system: bool) -> CommandResult:
        marker = f"[gvisor-magic:start:{secrets.token_hex(8)}]" if host_system else None
        # The relay answers tools' proxy requests with "the network is off" and notes them.
        layer = layer_setting(request.spec, layout.identity)
        if layer and not marker:  # given explicitly (run() made the default direct here)
            raise SandboxStartError(self.name, f"writes={request.spec.writes!r} needs the "
                                    "sandbox's own init, which an image of its own "
                                    "(GVISOR_MAGIC_IMAGE) does not run",
                                    fix="unset GVISOR_MAGIC_IMAGE, or use writes='direct'",
                                    unsupported=True)
        started_ns = start_stamp()
        argv = (init_argv(marker, request.argv, request.timeout,
                          relay_setting(request.network), layer)
                if marker else list(request.argv))
        api = self.client().api
        # Held writes: the init starts as root of the sandbox to mount the layer.
        cid = self.create(request.spec, layout, argv, runtime, image,
                          stdin_open=request.stdin is not None,
                          init_capabilities=LAYER_CAPABILITIES if layer else ())
        process = DockerProcess(api, cid, request.stdin)
        started = False
        oom = ContainerOOMWatch(cid)
        try:
            process.start()  # raises SandboxStartError while the command cannot have run
            started = True
            outcome = supervise(process, kill=process.kill, timeout=request.timeout,
                                on_output=on_output, max_output=request.max_output,
                                stderr_gate=marker.encode() if marker else None)
        finally:
            oom_kills = oom.close()
            process.close()
            if not started or process.error:
                remove_container(api, cid)
            if not started:
                # A start that failed inside runsc can leave its containerd shim and
                # sandbox processes running, unknown to Docker's own list.
                kill_processes_mentioning(cid, "container")
        status = read_status(os.path.join(status_dir, "status"))
        blocked = relay_attempts(read_attempts(status_dir), request.network)
        writes = None
        if layer:
            writes = take_held_writes(request.spec, status_dir, started_ns, completed=bool(
                started and not outcome.timed_out and not outcome.interrupted and not oom_kills
                and not process.error and started_in(status_dir)
                and not status.startswith("signal")))
        if marker and not outcome.gate_seen and started_in(status_dir):
            # It may have run (see sandbox_init): report it, never try elsewhere.
            outcome.stderr.add(outcome.pre_gate.replace(marker.encode(), b"", 1))
        elif marker and not outcome.gate_seen:
            if outcome.interrupted:
                raise KeyboardInterrupt
            text = outcome.pre_gate.decode("utf-8", "replace").strip()
            raise SandboxStartError(self.name, text or process.error or
                                    f"the container exited {outcome.returncode} before the "
                                    "command started")
        error = process.error
        returncode = returncode_of(outcome.returncode, init_status=status,
                                   timed_out=outcome.timed_out, interrupted=outcome.interrupted,
                                   failed=bool(error))
        if (marker and returncode >= 128 and not status
                and not (error or outcome.timed_out or outcome.interrupted)):
            # The init reports every status >= 128: without a report, the sandbox
            # itself ended under the command (the container's cgroups kill it whole).
            error = (f"the sandbox ended (exit {returncode}) before the command reported "
                     "its status" + (f"; the container's memory cgroup "
                                     f"(Limits.memory, {request.limits.memory >> 20} MiB) "
                                     "kills it with 137" if returncode == 137
                                     and request.limits.memory else ""))
        if oom_kills and not error:
            error = (f"memory limit: the container reached its limit of "
                     f"{(request.limits.memory or 0) >> 20} MiB (container cgroup) and the "
                     "process that crossed it was killed")
            returncode = 137
        result = CommandResult.from_streams(
            outcome.stdout, outcome.stderr, returncode=returncode, backend=self.name,
            isolated=True, timed_out=outcome.timed_out, duration=outcome.duration,
            network=request.network, error=error, blocked=blocked,
            details={"container_id": cid[:12], "runtime": runtime, "image": image,
                     **layout.details()})
        result = with_writes(result, writes)
        if outcome.interrupted:
            raise CommandInterrupted(result)
        return result

    def create(self, spec: SandboxSpec, layout: SandboxLayout, argv: list[str],
               runtime: str, image: str, *, stdin_open: bool,
               init_capabilities: tuple[str, ...] = ()) -> str:
        """Create (not start) the container; its id. Nothing has run yet.

        ``init_capabilities``: the container's init starts as root with these (gVisor's
        own, never the host's) and takes the caller's identity itself (a warm session's
        relay, see ``session_agent.hide``); otherwise it starts as the caller."""
        api = self.client().api
        remove_orphan_containers(api)
        user = ("0:0" if init_capabilities
                else f"{layout.identity.uid}:{layout.identity.gid}")
        try:
            container = api.create_container(
                image, command=argv, user=user,
                environment=[f"{k}={v}" for k, v in layout.env.items()],
                working_dir=layout.cwd, hostname=layout.hostname, detach=False,
                stdin_open=stdin_open,
                labels={LABEL: "1", f"{LABEL}.owner-pid": str(os.getpid())},
                host_config=self._host_config(api, spec, layout, runtime,
                                              list(init_capabilities)))
        except Exception as exc:
            raise SandboxStartError(self.name, f"cannot create the container: {exc}") from exc
        return container["Id"]

    def _host_config(self, api, sandbox: SandboxSpec, layout: SandboxLayout, runtime: str,
                     cap_add: list[str]):
        from docker.types import LogConfig, Mount, Ulimit

        mounts, tmpfs = [], {}
        for link in layout.symlinks:
            real = os.path.realpath(link)
            mounts.append(Mount(link, real, type="bind", read_only=True))
        etc = next((m.source for m in layout.mounts if m.destination == "/etc"), None)
        if etc is not None:
            # Docker mounts its own resolv.conf (the host's resolver), hosts and hostname
            # unless the container has mounts there: give it the layout's.
            for name in ("resolv.conf", "hosts", "hostname"):
                mounts.append(Mount(f"/etc/{name}", os.path.join(etc, name), type="bind",
                                    read_only=True))
        for spec in layout.sorted_mounts():
            if spec.kind == "bind":
                mounts.append(Mount(spec.destination, spec.source, type="bind",
                                    read_only=spec.read_only))
            elif spec.kind == "tmpfs":
                tmpfs[spec.destination] = ",".join(
                    [*spec.options, "ro" if spec.read_only else "rw", "nosuid", "nodev"])
        limits = sandbox.limits
        names = {"RLIMIT_NOFILE": "nofile", "RLIMIT_FSIZE": "fsize", "RLIMIT_NPROC": "nproc",
                 "RLIMIT_AS": "as"}
        ulimits = [Ulimit(name=names[key], soft=value, hard=value)
                   for key, value in limits.rlimits().items() if key in names]
        return api.create_host_config(
            runtime=runtime, network_mode="none", read_only=True, auto_remove=True,
            mounts=mounts, tmpfs=tmpfs, cap_drop=["ALL"], cap_add=cap_add or None,
            security_opt=["no-new-privileges"],
            pids_limit=docker_pids_limit(limits.max_processes), mem_limit=limits.memory,
            memswap_limit=limits.memory, nano_cpus=int(limits.cpus * 1e9) if limits.cpus else None,
            ulimits=ulimits, shm_size="64m",
            # The output is streamed to the caller; Docker's default json-file log
            # would also write all of it (GBs from a flood) to the host's disk.
            log_config=LogConfig(type="none"))


def docker_pids_limit(max_processes: int | None) -> int | None:
    """The container's pids cgroup counts gVisor's own host tasks too: the Sentry's and the
    gofer's threads (a sandbox with max_processes=64 never started with a pids limit of 64)
    and a host stub per process of the command (300 sleeps used 308 tasks). gVisor holds
    the command to ``max_processes`` itself (RLIMIT_NPROC); the cgroup only stops gVisor
    from taking the host's pids, so it gets room for both. A fork bomb held at 512 processes
    (dying ones still counted) used 1,276 tasks of the 1,280 it had, and one that reached the
    limit killed its sandbox (seen here 2026-12-07): hence 3x, plus room for the Sentry."""
    return None if max_processes is None else 3 * max_processes + 512


def docker_identity() -> Identity:
    """The caller's real uid/gid: Docker maps nothing, so files land as the caller's."""
    ident = caller_identity()
    return Identity(os.getuid(), os.getgid(), ident.user if ident.uid == os.getuid() else
                    f"u{os.getuid()}", ident.home)


#: A never-started container whose owner is gone and that is older than this is an orphan.
ORPHAN_AGE = 60.0
#: Seconds between two sweeps for orphans by one process.
SWEEP_INTERVAL = 60.0
_last_sweep = [0.0]


def remove_orphan_containers(api, min_age: float = ORPHAN_AGE, force: bool = False) -> list[str]:
    """Remove containers this package created that were never started and whose owner
    process is gone: dockerd finishes a create even when the caller died during the call
    (a kernel killed mid-cell), and nothing would start or remove such a container.

    Only never-started ones, and only after ``min_age`` seconds, so a container another
    process (in another pid namespace, sharing the daemon) is about to start is left alone.
    Runs at most every ``SWEEP_INTERVAL`` seconds per process unless ``force``; returns
    the ids removed."""
    now = time.time()
    if not force and now - _last_sweep[0] < SWEEP_INTERVAL:
        return []
    _last_sweep[0] = now
    removed = []
    try:
        found = api.containers(all=True, filters={"label": f"{LABEL}=1", "status": "created"})
    except Exception as exc:  # the create that follows reports a daemon problem itself
        log.info("gvisor: could not list containers to sweep orphans (%s)", exc)
        return removed
    for container in found:
        owner = (container.get("Labels") or {}).get(f"{LABEL}.owner-pid", "")
        if not owner.isdigit() or psutil.pid_exists(int(owner)):
            continue
        if now - container.get("Created", now) < min_age:
            continue
        log.info("gvisor: removing container %s, never started, its owner %s is gone",
                 container["Id"][:12], owner)
        remove_container(api, container["Id"])
        removed.append(container["Id"])
    return removed


def remove_container(api, cid: str) -> None:
    """Remove the container; if the daemon is gone, kill what serves it directly."""
    import docker.errors

    try:
        api.remove_container(cid, force=True)
    except docker.errors.NotFound:
        pass
    except Exception as exc:
        log.warning("gvisor: could not remove container %s (%s); killing its processes",
                    cid[:12], exc)
        kill_processes_mentioning(cid, "container")
