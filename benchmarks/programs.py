#!/usr/bin/env python3
"""What a warm command costs for the programs users run, against gVisor's own floor.

For each program (``/bin/true``, ``ls /``, ``git status`` in a small repository,
``python3 -c pass``), in one warm runsc session, interleaved round by round:

- **floor**: the program exec'd in a loop by one shell inside the sandbox, timed inside
  with ``date +%s%N`` (what gVisor itself charges for starting it, with no host involved);
- **warm argv, spaced**: ``session.run(argv)`` with a pause before each (as notebook cells
  arrive), and **back to back**;
- **warm bash cell, spaced**: the same command as a one-line bash script in a bash session
  (what ``%%isolated`` runs);
- **one-shot**: ``run_command_isolated(argv)`` repeated (the second and later calls of a
  spec reuse a warm sandbox), a spec's second call in the sandbox the pool booted ahead of
  need after its first, and with ``reuse=False`` (a fresh sandbox per call);
- **peers**, for the same argv: ``runsc exec`` into a running sandbox (a minimal bundle
  of read-only host dirs, as the official package builds), ``docker exec`` into a
  running runsc container, the official ``gvisor`` package's ``Sandbox.exec`` (if
  installed: ``pip install -e '.[bench]'``), ``runsc do`` and ``docker run --rm
  --runtime=runsc``.

Prints medians and each method's ratio to the floor; ``--json`` for JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latency import _docker_run_command  # this directory

from gvisor_magic import IsolatedSession, SandboxSpec, run_command_isolated
from gvisor_magic.backends.runsc import locate_runsc
from gvisor_magic.warm import POOL

PROGRAMS = {
    "/bin/true": ["/bin/true"],
    "ls /": ["ls", "/"],
    "git status": ["git", "status", "--short"],
    "/usr/bin/python3 -c pass": ["/usr/bin/python3", "-c", "pass"],
}
FLOOR_LOOP = 10  # execs per floor sample
PAUSE = 0.2  # seconds before a "spaced" command


def small_repo() -> str:
    work = tempfile.mkdtemp(prefix="gvm-bench-prog-")
    for index in range(20):
        with open(os.path.join(work, f"file{index}.txt"), "w") as handle:
            handle.write(f"{index}\n")
    git = ["git", "-c", "user.email=bench@example.invalid", "-c", "user.name=bench"]
    subprocess.run([*git, "init", "-q"], cwd=work, check=True)
    subprocess.run([*git, "add", "."], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=work, check=True)
    return work


SYSTEM = ("/bin", "/sbin", "/usr", "/lib", "/lib64", "/etc")
HOST_DIRS = [path for path in SYSTEM if os.path.isdir(path) and not os.path.islink(path)]
#: Merged-/usr systems: /bin -> usr/bin and so on, as links in the bare rootfs.
HOST_LINKS = {path: os.readlink(path) for path in SYSTEM if os.path.islink(path)}


def runsc_exec_peer(runsc: str, work: str, closers: list) -> Callable[[list[str]], object]:
    """``runsc exec`` into a running sandbox: a bare bundle (empty rootfs, read-only host
    dirs, the repo read-write) whose PID 1 sleeps."""
    root = tempfile.mkdtemp(prefix="gvm-bench-runsc-")
    os.makedirs(os.path.join(root, "bundle", "rootfs"))
    os.makedirs(os.path.join(root, "state"))
    for link, target in HOST_LINKS.items():
        os.symlink(target, os.path.join(root, "bundle", "rootfs", link.lstrip("/")))
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}]
    mounts += [{"destination": path, "type": "bind", "source": os.path.realpath(path),
                "options": ["rbind", "ro"]} for path in HOST_DIRS]
    mounts.append({"destination": work, "type": "bind", "source": work,
                   "options": ["rbind", "rw"]})
    spec = {"ociVersion": "1.0.0", "root": {"path": "rootfs", "readonly": True},
            "process": {"args": ["sleep", "infinity"], "cwd": "/",
                        "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp"],
                        "user": {"uid": 0, "gid": 0}},
            "hostname": "bench", "mounts": mounts,
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]}}
    with open(os.path.join(root, "bundle", "config.json"), "w") as handle:
        json.dump(spec, handle)
    flags = [runsc, "--root", os.path.join(root, "state"), "--network=none",
             "--ignore-cgroups"]
    name = f"gvm-bench-{os.getpid()}"

    def close() -> None:
        subprocess.run([*flags, "delete", "--force", name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    closers.append(close)
    subprocess.run([*flags, "run", "--detach", "--bundle", os.path.join(root, "bundle"), name],
                   check=True, stdout=subprocess.DEVNULL, timeout=60)
    return lambda argv: subprocess.run([*flags, "exec", "--cwd", work, name, *argv],
                                       check=True, stdout=subprocess.DEVNULL)


def docker_exec_peer(work: str, closers: list) -> Callable[[list[str]], object] | None:
    """``docker exec`` into a running runsc container (and the ``docker run`` line)."""
    run = _docker_run_command(["sleep", "infinity"])
    if run is None:
        return None
    at = run.index("--rm")
    run[at:at + 1] = ["-d", "-v", f"{work}:{work}", "-w", work]
    container = subprocess.run(run, check=True, capture_output=True, text=True,
                               timeout=120).stdout.strip()
    closers.append(lambda: subprocess.run(["docker", "rm", "-f", container],
                                          stdout=subprocess.DEVNULL, timeout=60))
    return lambda argv: subprocess.run(["docker", "exec", container, *argv], check=True,
                                       stdout=subprocess.DEVNULL)


def peers(work: str, closers: list) -> dict[str, Callable[[list[str]], object]]:
    found: dict[str, Callable[[list[str]], object]] = {}
    runsc = locate_runsc()
    if runsc:
        found["peer: runsc exec (running sandbox)"] = runsc_exec_peer(runsc, work, closers)
    try:
        docker_exec = docker_exec_peer(work, closers)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"(docker exec skipped: {exc})", file=sys.stderr)
        docker_exec = None
    if docker_exec is not None:
        found["peer: docker exec (running runsc container)"] = docker_exec
    try:
        import gvisor  # the official package, a benchmark-only peer

        sandbox = gvisor.Sandbox(mounts=[gvisor.Mount(work, work, gvisor.MountType.BIND)])
        closers.append(sandbox.close)
        found["peer: official gvisor Sandbox.exec"] = (
            lambda argv: sandbox.exec(*argv, cwd=work))
        sandbox.exec("true", cwd=work)
    except Exception as exc:  # absent, or another version's API
        print(f"(official gvisor package skipped: {exc})", file=sys.stderr)
        found.pop("peer: official gvisor Sandbox.exec", None)
    if runsc:
        found["peer: runsc do"] = lambda argv: subprocess.run(
            [runsc, "--network=none", "--ignore-cgroups", "do", *argv], cwd=work, check=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    docker_run = _docker_run_command(["true"])
    if docker_run is not None:
        at = docker_run.index("--rm")

        def docker_run_peer(argv: list[str]) -> object:
            line = list(docker_run[:-1])
            line[at + 1:at + 1] = ["-v", f"{work}:{work}", "-w", work]
            return subprocess.run([*line, *argv], check=True, stdout=subprocess.DEVNULL)

        found["peer: docker run --rm --runtime=runsc"] = docker_run_peer
    return found


_READY_SPECS = iter(range(1_000_000))


def ready_call(argv: list[str], work: str):
    """A spec's second call, the sandbox the pool booted after its first one ready: a new
    spec each time (another host name), its first call and the boot untimed."""
    spec = SandboxSpec.from_options({"working_dir": work,
                                     "hostname": f"ready-{next(_READY_SPECS)}"})
    started = time.perf_counter()
    run_command_isolated(["true"], mode="runsc", spec=spec)
    while not any(key[1] == spec for key in list(POOL._idle)):
        if time.perf_counter() - started > 60:
            raise SystemExit("no sandbox was booted ahead of need")
        time.sleep(0.01)
    timed = time.perf_counter()
    result = run_command_isolated(argv, mode="runsc", spec=spec)
    elapsed = time.perf_counter() - timed
    with POOL._lock:  # this spec is never used again: its sandbox goes (the pool's limit)
        gone = [entry for key in list(POOL._idle) if key[1] == spec
                for entry in POOL._idle.pop(key)]
    for entry in gone:
        entry.sandbox.close()
    if "ready" not in result.details:
        raise SystemExit(f"the call did not run in the ready sandbox: {result.details}")
    return _Timed(result.returncode, elapsed)


class _Timed:
    """A result whose time was taken by the call itself (``timed`` uses ``elapsed``)."""

    def __init__(self, returncode: int, elapsed: float) -> None:
        self.returncode, self.elapsed = returncode, elapsed


def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    work = small_repo()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in PROGRAMS}
    sh = IsolatedSession(work, mode="runsc", shell="/bin/sh")
    bash = IsolatedSession(work, mode="runsc", shell=shutil.which("bash") or "/bin/sh")
    closers: list = []
    try:
        sh.start()
        bash.start()
        others = peers(work, closers)
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for name, argv in PROGRAMS.items():
                line = shlex.join(argv)
                got = samples[name]
                loop = (f"a=$(date +%s%N); i=0; while [ $i -lt {FLOOR_LOOP} ]; do "
                        f"{line} >/dev/null; i=$((i+1)); done; b=$(date +%s%N); "
                        f"echo $((b - a))")
                floor = sh.run(loop)
                got.setdefault("floor (in-sandbox loop)", []).append(
                    int(floor.stdout) / 1e9 / FLOOR_LOOP)

                def timed(label: str, action, pause: float = 0.0, name: str = name,
                          got: dict = got) -> None:
                    time.sleep(pause)
                    start = time.perf_counter()
                    result = action()
                    elapsed = getattr(result, "elapsed", time.perf_counter() - start)
                    if getattr(result, "returncode", 0) != 0:
                        raise SystemExit(f"{label} {name} failed: {result}")
                    got.setdefault(label, []).append(elapsed)

                timed("warm argv, spaced", lambda a=argv: sh.run(a), PAUSE)
                timed("warm argv, back to back", lambda a=argv: sh.run(a))
                timed("warm bash cell, spaced", lambda c=line: bash.run(c), PAUSE)
                timed("one-shot run_command_isolated, repeated (reuses a warm sandbox)",
                      lambda a=argv: run_command_isolated(a, mode="runsc", working_dir=work),
                      PAUSE)
                timed("one-shot, first call in a sandbox booted ahead of need",
                      lambda a=argv: ready_call(a, work))
                timed("one-shot, reuse=False (a fresh sandbox per call)",
                      lambda a=argv: run_command_isolated(a, mode="runsc", working_dir=work,
                                                          reuse=False))
                for label, peer in others.items():
                    timed(label, lambda a=argv, p=peer: p(a))
        for got in samples.values():
            for label in got:
                got[label] = got[label][1:]
    finally:
        sh.close()
        bash.close()
        for close in closers:
            try:
                close()
            except Exception as exc:  # keep closing the others
                print(f"(cleanup: {exc})", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    samples = measure(args.rounds)
    medians = {name: {label: statistics.median(values) for label, values in got.items()}
               for name, got in samples.items()}
    if args.json:
        print(json.dumps(medians, indent=2))
        return 0
    labels = list(next(iter(medians.values())))
    print("| method | " + " | ".join(f"`{name}`" for name in medians) + " |")
    print("| --- |" + " --- |" * len(medians))
    for label in labels:
        cells = []
        for figures in medians.values():
            value, floor = figures[label], figures["floor (in-sandbox loop)"]
            ratio = "" if label.startswith("floor") else f" ({value / floor:.2f}x)"
            cells.append(f"{value * 1000:.1f} ms{ratio}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nmedians of {args.rounds} interleaved rounds; (Nx) = the method / the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
