#!/usr/bin/env python3
"""Per-command wall time of every way to run a command, measured interleaved in one process.

Interleaving (one run of every method per round) makes machine drift hit all
methods alike. Methods: a host subprocess, our backends one-shot (runsc,
Docker, subprocess), our warm sessions (runsc, Docker), and the peers
``runsc do``, ``docker run --rm --runtime=runsc`` and the official ``gvisor``
package's ``Sandbox.exec`` (``pip install gvisor``; skipped if absent). Also the
cold start (a new session's first command) and close time of sessions.
Prints a table of medians and p95 and the ratios; ``--json`` for JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gvisor_magic import IsolatedSession, run_command_isolated
from gvisor_magic.backends.runsc import locate_runsc

# What each method is asked to run. A str is a shell command (every method runs it
# with ``sh -c``, as a notebook's ``!true`` does); a list is an argv, executed as is,
# which under gVisor costs one more exec (~10 ms here).
COMMANDS: dict[str, str | list[str]] = {
    "true": "true",
    "/bin/true (argv)": ["true"],
    "small script": "for i in 1 2 3; do echo $i; done | wc -l",
}


def methods(command: str | list[str]) -> dict[str, Callable[[], None]]:
    shell_argv = ["sh", "-c", command] if isinstance(command, str) else command
    runsc = locate_runsc()
    work = tempfile.mkdtemp(prefix="gvm-bench-")

    def check(result) -> None:
        if not result.success:
            raise SystemExit(f"benchmark command failed: {result}")

    table: dict[str, Callable[[], None]] = {
        "host sh (subprocess.run)": lambda: subprocess.run(shell_argv, check=True,
                                                           stdout=subprocess.DEVNULL),
        "subprocess backend": lambda: check(run_command_isolated(
            command, mode="subprocess", working_dir=work)),
    }
    if runsc:
        table["runsc backend (one-shot)"] = lambda: check(run_command_isolated(
            command, mode="runsc", working_dir=work, reuse=False))
        table["runsc do"] = lambda: subprocess.run(
            [runsc, "--network=none", "--ignore-cgroups", "do", *shell_argv], check=True,
            stdout=subprocess.DEVNULL, cwd=work)
    docker_run = _docker_run_command(shell_argv)
    if docker_run:
        table["docker backend (one-shot)"] = lambda: check(run_command_isolated(
            command, mode="docker", working_dir=work, reuse=False))
        table["docker run --rm --runtime=runsc"] = lambda: subprocess.run(
            docker_run, check=True, stdout=subprocess.DEVNULL)
    closers = [lambda: shutil.rmtree(work, ignore_errors=True)]
    for mode in ("runsc", "docker"):
        try:
            session = IsolatedSession(work, mode=mode)
            session.start()
        except Exception as exc:
            print(f"(warm {mode} session skipped: {exc})", file=sys.stderr)
            continue
        closers.insert(0, session.close)
        table[f"warm session {mode}"] = (
            lambda s=session: check(s.run(command)))
    bash = shutil.which("bash")
    if runsc and bash and isinstance(command, str):
        # The magics run cells with bash: the agent keeps a bash started for them too.
        try:
            session = IsolatedSession(work, mode="runsc", shell=bash)
            session.start()
            closers.insert(0, session.close)
            table["warm session runsc, bash (as %%isolated)"] = (
                lambda s=session: check(s.run(command)))
        except Exception as exc:
            print(f"(warm bash session skipped: {exc})", file=sys.stderr)
    try:
        import gvisor  # the official package, a benchmark-only peer

        sandbox = gvisor.Sandbox()
        closers.insert(0, sandbox.close)
        table["official gvisor Sandbox.exec"] = lambda: sandbox.exec(*shell_argv)
    except Exception as exc:
        print(f"(official gvisor package skipped: {exc})", file=sys.stderr)
    methods.cleanup = lambda: [close() for close in closers]  # type: ignore[attr-defined]
    return table


def _docker_run_command(shell_argv: list[str]) -> list[str] | None:
    """The plain CLI equivalent, when Docker with a runsc runtime is usable here."""
    from gvisor_magic.backends.docker import DockerBackend
    from gvisor_magic.errors import SandboxStartError

    backend = DockerBackend()
    try:
        runtime, _config = backend.find_runtime()
        image = backend.image()
    except SandboxStartError as exc:
        print(f"(docker methods skipped: {exc.reason})", file=sys.stderr)
        return None
    docker = shutil.which("docker")
    if docker is None:
        return None
    binds = [arg for path in ("/usr", "/lib", "/lib64", "/bin", "/sbin") if os.path.exists(path)
             for arg in ("-v", f"{os.path.realpath(path)}:{path}:ro")]
    return [docker, "run", "--rm", f"--runtime={runtime}", "--network=none", "--read-only",
            *binds, image, *shell_argv]


def measure(rounds: int, warmup: int, command: str | list[str]) -> dict[str, list[float]]:
    table = methods(command)
    samples: dict[str, list[float]] = {name: [] for name in table}
    try:
        for index in range(warmup + rounds):
            for name, action in table.items():
                start = time.perf_counter()
                action()
                elapsed = time.perf_counter() - start
                if index >= warmup:
                    samples[name].append(elapsed)
    finally:
        methods.cleanup()  # type: ignore[attr-defined]
    return samples


def session_life(rounds: int) -> dict[str, dict[str, float]]:
    """Cold start (new session, first command) and close time, per warm backend."""
    figures = {}
    work = tempfile.mkdtemp(prefix="gvm-bench-")
    try:
        for mode in ("runsc", "docker"):
            cold, close = [], []
            try:
                for _ in range(rounds):
                    start = time.perf_counter()
                    session = IsolatedSession(work, mode=mode)
                    session.run("true")
                    cold.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    session.close()
                    close.append(time.perf_counter() - start)
            except Exception as exc:
                print(f"({mode} session life skipped: {exc})", file=sys.stderr)
                continue
            figures[mode] = {"cold_first_command_ms": statistics.median(cold) * 1000,
                             "close_ms": statistics.median(close) * 1000}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def summarise(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in samples.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        out[name] = {"median_ms": statistics.median(values) * 1000, "p95_ms": p95 * 1000,
                     "runs": len(values)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {}
    for label, command in COMMANDS.items():
        stats = summarise(measure(args.rounds, args.warmup, command))
        ratios = {}
        for ours, peer in (("runsc backend (one-shot)", "runsc do"),
                           ("docker backend (one-shot)", "docker run --rm --runtime=runsc"),
                           ("warm session runsc", "runsc do"),
                           ("warm session runsc", "official gvisor Sandbox.exec"),
                           ("warm session docker", "docker run --rm --runtime=runsc")):
            if ours in stats and peer in stats:
                ratios[f"{ours} / {peer}"] = stats[ours]["median_ms"] / stats[peer]["median_ms"]
        report[label] = {"methods": stats, "ratios": ratios}
    report["sessions"] = session_life(max(3, args.rounds // 4))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for mode, figures in report.pop("sessions").items():
        print(f"\n{mode} session: cold start + first command median "
              f"{figures['cold_first_command_ms']:.0f} ms, "
              f"close median {figures['close_ms']:.0f} ms")
    for label, data in report.items():
        print(f"\ncommand: {label}   ({args.rounds} interleaved rounds, {os.cpu_count()} cores)")
        print(f"{'method':<28}{'median ms':>12}{'p95 ms':>10}")
        for name, row in data["methods"].items():
            print(f"{name:<28}{row['median_ms']:>12.1f}{row['p95_ms']:>10.1f}")
        for name, ratio in data["ratios"].items():
            print(f"ratio {name}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
