#!/usr/bin/env python3
"""Per-command wall time of each way to run ``true``, measured interleaved in one process.

Interleaving (one run of every method per round) makes machine drift hit all
methods alike. Prints a table of medians and p95, and the ratio of the runsc
backend to ``runsc do`` (the lower bound for a fresh gVisor sandbox per
command); ``--json`` prints the same figures as JSON.
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

from gvisor_magic import run_command_isolated
from gvisor_magic.backends.runsc import locate_runsc


def methods(script: bool) -> dict[str, Callable[[], None]]:
    command: list[str] | str = "for i in 1 2 3; do echo $i; done | wc -l" if script else ["true"]
    shell_argv = ["sh", "-c", command] if script else ["true"]
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
            command, mode="runsc", working_dir=work))
        table["runsc do"] = lambda: subprocess.run(
            [runsc, "--network=none", "--ignore-cgroups", "do", *shell_argv], check=True,
            stdout=subprocess.DEVNULL, cwd=work)
    docker_run = _docker_run_command(shell_argv)
    if docker_run:
        table["docker backend (one-shot)"] = lambda: check(run_command_isolated(
            command, mode="docker", working_dir=work))
        table["docker run --rm --runtime=runsc"] = lambda: subprocess.run(
            docker_run, check=True, stdout=subprocess.DEVNULL)
    methods.cleanup = lambda: shutil.rmtree(work, ignore_errors=True)  # type: ignore[attr-defined]
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


def measure(rounds: int, warmup: int, script: bool) -> dict[str, list[float]]:
    table = methods(script)
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
    for label, script in (("true", False), ("small script", True)):
        stats = summarise(measure(args.rounds, args.warmup, script))
        ratios = {}
        for ours, peer in (("runsc backend (one-shot)", "runsc do"),
                           ("docker backend (one-shot)", "docker run --rm --runtime=runsc")):
            if ours in stats and peer in stats:
                ratios[f"{ours} / {peer}"] = stats[ours]["median_ms"] / stats[peer]["median_ms"]
        report[label] = {"methods": stats, "ratios": ratios}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
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
