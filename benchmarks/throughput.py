#!/usr/bin/env python3
"""Stdout throughput: 50 MB of output through every way to run a command.

The command writes ``--megabytes`` MiB to stdout, made by one of two producers
(``--producer``, both by default): ``blocks`` is one process writing 64 KiB at
a time (``dd``), so the figure is the backend's own stdout path; ``pipeline``
is ``head -c N /dev/zero | tr '\\0' x``, coreutils writing 8 KiB at a time
through a pipe inside the sandbox. Under gVisor every pipe write is a costly
trip through its kernel, so such small-write tools run at a fraction of their
host speed whichever backend carries the output. Every method but the
baseline streams it through an ``on_output`` callback that counts what arrives
(so the bytes really cross into this process) with the default capture cap
(4 MiB: the result is truncated). Methods: a host subprocess read fully into
memory (``subprocess.run`` to a pipe, the baseline), our ``subprocess`` backend,
runsc and Docker one-shot (sandbox start and stop included in the time), and
warm runsc and Docker sessions. Rounds are interleaved (one run of every
method per round) so machine drift hits all methods alike.

Reported per method: MB/s (median over ``--rounds``), its ratio to the host
baseline and to our subprocess backend, and the peak RSS growth of this process
during a run (RSS sampled every 10 ms; max over rounds of peak minus the RSS at
the start of the run). Prints a table; ``--json`` for JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gvisor_magic import IsolatedSession, detect_environment, run_command_isolated
from gvisor_magic.request import DEFAULT_MAX_OUTPUT

MB = 1024 * 1024
HOST = "host sh (subprocess.run)"
SUBPROCESS = "subprocess backend"


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, so memory freed by one run is not reused by the next."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


TRIM = _malloc_trim()


class PeakRss:
    """Peak RSS growth of this process while the ``with`` block runs.

    Garbage is collected and freed heap returned to the system first, so the
    growth counts what the run needs, not what an earlier run left for reuse.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        gc.collect()
        TRIM()
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / MB


class Counter:
    """An ``on_output`` callback that counts streamed stdout bytes."""

    def __init__(self) -> None:
        self.stdout = 0
        self.stderr = 0

    def __call__(self, stream: str, text: str) -> None:
        # The output is ASCII 'x', so characters are bytes; no re-encoding needed.
        if stream == "stdout":
            self.stdout += len(text)
        else:
            self.stderr += len(text)


Method = Callable[[Counter], None]


def methods(command: str, size: int) -> tuple[dict[str, Method], Callable[[], None]]:
    """The methods usable here, and a cleanup that closes their sessions."""
    work = tempfile.mkdtemp(prefix="gvm-bench-")

    def check(result, backend: str) -> None:
        if not result.success or result.backend != backend:
            raise SystemExit(f"benchmark command failed on {backend}: {result.describe()} "
                             f"{result.stderr[-500:]}")
        expect_truncated = size > DEFAULT_MAX_OUTPUT
        if result.truncated != expect_truncated or len(result.stdout) != min(
                size, DEFAULT_MAX_OUTPUT):
            raise SystemExit(f"{backend}: captured {len(result.stdout)} bytes "
                             f"(truncated={result.truncated}), expected the "
                             f"{DEFAULT_MAX_OUTPUT} byte cap")

    def host(counter: Counter) -> None:
        proc = subprocess.run(command, shell=True, check=True, stdout=subprocess.PIPE)
        counter.stdout += len(proc.stdout)

    def one_shot(mode: str) -> Method:
        return lambda counter: check(run_command_isolated(
            command, working_dir=work, mode=mode, on_output=counter, reuse=False), mode)

    table: dict[str, Method] = {HOST: host, SUBPROCESS: one_shot("subprocess")}
    statuses = detect_environment(refresh=True).backends
    for mode in ("runsc", "docker"):
        status = statuses.get(mode)
        if status is None or not status.available:
            why = status.reason if status else "unknown backend"
            print(f"({mode} backend (one-shot) skipped: {why})", file=sys.stderr)
            continue
        table[f"{mode} backend (one-shot)"] = one_shot(mode)
    closers: list[Callable[[], None]] = [lambda: shutil.rmtree(work, ignore_errors=True)]
    for mode in ("runsc", "docker"):
        try:
            session = IsolatedSession(work, mode=mode)
            closers.insert(0, session.close)
            session.start()
        except Exception as exc:
            print(f"(warm {mode} session skipped: {exc})", file=sys.stderr)
            continue
        table[f"warm session {mode}"] = (
            lambda counter, s=session, m=mode: check(s.run(command, on_output=counter), m))

    def cleanup() -> None:
        for close in closers:
            close()

    return table, cleanup


PRODUCERS = {
    "blocks": "dd if=/dev/zero bs=64k count={blocks} status=none",
    "pipeline": "head -c {size} /dev/zero | tr '\\0' x",
}


def measure(rounds: int, warmup: int, size: int, command: str
            ) -> dict[str, dict[str, list[float]]]:
    table, cleanup = methods(command, size)
    samples = {name: {"seconds": [], "rss_growth_mb": []} for name in table}
    try:
        for index in range(warmup + rounds):
            for name, action in table.items():
                counter = Counter()
                with PeakRss() as rss:
                    start = time.perf_counter()
                    action(counter)
                    elapsed = time.perf_counter() - start
                if counter.stdout != size:
                    raise SystemExit(f"{name}: {counter.stdout} of {size} bytes arrived "
                                     "through on_output")
                if index >= warmup:
                    samples[name]["seconds"].append(elapsed)
                    samples[name]["rss_growth_mb"].append(rss.growth_mb)
    finally:
        cleanup()
    return samples


def summarise(samples: dict[str, dict[str, list[float]]], size: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, values in samples.items():
        seconds = statistics.median(values["seconds"])
        out[name] = {"mb_per_s": size / MB / seconds, "median_s": seconds,
                     "peak_rss_growth_mb": max(values["rss_growth_mb"]),
                     "runs": len(values["seconds"])}
    for row in out.values():
        for key, reference in (("vs_host", HOST), ("vs_subprocess_backend", SUBPROCESS)):
            if reference in out:
                row[key] = row["mb_per_s"] / out[reference]["mb_per_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--megabytes", type=int, default=50, help="MiB of stdout per run")
    parser.add_argument("--producer", choices=[*PRODUCERS, "both"], default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = args.megabytes * MB
    chosen = list(PRODUCERS) if args.producer == "both" else [args.producer]
    results = {}
    for producer in chosen:
        command = PRODUCERS[producer].format(size=size, blocks=size // (64 * 1024))
        results[producer] = {"command": command, "methods": summarise(
            measure(args.rounds, args.warmup, size, command), size)}
    if args.json:
        print(json.dumps({"megabytes": args.megabytes, "rounds": args.rounds,
                          "max_output": DEFAULT_MAX_OUTPUT, "producers": results}, indent=2))
        return 0
    print(f"{args.megabytes} MiB of stdout streamed through on_output, capture cap "
          f"{DEFAULT_MAX_OUTPUT // MB} MiB   ({args.rounds} interleaved rounds, "
          f"{os.cpu_count()} cores)")
    for producer, result in results.items():
        print(f"\nproducer {producer}: {result['command']}")
        print(f"{'method':<28}{'MB/s':>9}{'x host':>9}{'x subproc':>11}{'peak RSS +MB':>14}")
        for name, row in result["methods"].items():
            print(f"{name:<28}{row['mb_per_s']:>9.1f}{row.get('vs_host', 0):>9.2f}"
                  f"{row.get('vs_subprocess_backend', 0):>11.2f}"
                  f"{row['peak_rss_growth_mb']:>14.1f}")
    print("\nx host / x subproc: MB/s relative to the host baseline / our subprocess backend; "
          "the host baseline keeps all output in memory, the others cap it at "
          f"{DEFAULT_MAX_OUTPUT // MB} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
