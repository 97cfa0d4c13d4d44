#!/usr/bin/env python3
"""What held writes (``writes="auto"``) cost against direct writes, measured side by side.

Every scenario is measured interleaved in one process (one run of every method per
round, so machine drift hits all methods alike), with medians and min-max:

Each setting runs one-shot (``reuse=False``: a sandbox made for the command) and in the
warm pool (``reuse=True``: a sandbox kept per spec, started before the rounds), on runsc
and on Docker (``--no-docker`` to skip it).

1. **writes nothing**: real programs (``true``, ``python3 -c pass``, ``ls -la``) with
   ``writes="direct"`` and ``writes="auto"``. Target: auto at most 5 ms over direct.
2. **many small files**: a command writes ``--files`` (1,000) new small files. The host's
   steps are timed inside this process by wrapping ``gvisor_magic.writes``'s functions:
   ``take_writes`` as a whole, and within it ``read_upper`` (detection), ``judge``
   (classification) and ``apply``. Target: detection + classification at most 100 ms.
   The in-sandbox copy-out is estimated from outside: the command prints its end time
   (``time.time_ns()`` inside gVisor, whose clock follows the host's), the host notes
   when the one-shot sandbox has ended; auto's gap less direct's is the init's kill and
   copy-out. Each run writes into a new subdirectory (a one-shot run in a new working dir).
3. **one big file**: a command writes ``--big-mb`` (500) MB; ``changes.apply`` throughput
   on the host (target at least 200 MB/s), the copy-out estimate, and the whole command
   (one-shot only unless ``--big-pool``).
4. **cold start**: a fresh Python process running one ``true`` with each setting (imports,
   ``HostContext.current()``'s first call and the sandbox's start included), and the
   first-call cost of ``HostContext.current()`` alone. Target: auto within 10% of direct.

Usage: ``python benchmarks/writes.py [--rounds N] [--no-docker] [--json]``; the defaults
take about three minutes on two cores. For whole-process figures from outside, time two
one-line scripts with ``/usr/bin/time -v`` (or ``hyperfine``), one per setting.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import gvisor_magic.activity as activity  # noqa: E402
import gvisor_magic.writes as writes_module  # noqa: E402
from gvisor_magic import SandboxSpec, run_command_isolated  # noqa: E402
from gvisor_magic.backends import docker as docker_module  # noqa: E402
from gvisor_magic.backends.runsc import RunscBackend, locate_runsc  # noqa: E402

NOTHING = {
    "true": ["true"],
    "python3 -c pass": ["python3", "-c", "pass"],
    "ls -la": ["ls", "-la"],
}


# --- timing the host's steps inside this process ---------------------------------------------


class Probe:
    """Seconds spent in the wrapped functions during one command, and when the sandbox ended.

    Wraps ``take_writes``, ``read_upper``, ``judge`` and ``apply`` in ``gvisor_magic.writes``
    (looked up there at call time) and notes the first moment the host deals with an ended
    sandbox: runsc's ``_cleanup``, Docker's ``read_status``.
    """

    STEPS = ("take_writes", "read_upper", "judge", "apply")

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.ended_ns: int | None = None
        for name in self.STEPS:
            setattr(writes_module, name, self._timed(name, getattr(writes_module, name)))
        cleanup = RunscBackend._cleanup

        def timed_cleanup(backend, *args, **kwargs):
            self._ended()
            return cleanup(backend, *args, **kwargs)

        RunscBackend._cleanup = timed_cleanup  # type: ignore[method-assign]
        read_status = docker_module.read_status

        def timed_read_status(*args, **kwargs):
            self._ended()
            return read_status(*args, **kwargs)

        docker_module.read_status = timed_read_status

    def _ended(self) -> None:
        if self.ended_ns is None:
            self.ended_ns = time.time_ns()

    def _timed(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start
        return timed

    def reset(self) -> None:
        self.spent = {}
        self.ended_ns = None


PROBE: Probe | None = None


# --- methods ------------------------------------------------------------------------------------


def docker_usable() -> bool:
    from gvisor_magic.backends.docker import DockerBackend
    from gvisor_magic.errors import SandboxStartError

    try:
        backend = DockerBackend()
        backend.find_runtime()
        backend.image()
        return True
    except SandboxStartError as exc:  # no daemon, no runsc runtime...
        print(f"(docker methods skipped: {exc.reason})", file=sys.stderr)
        return False


def command_runner(mode: str, writes: str, work: str, *, reuse: bool = False):
    """A function running an argv with ``writes`` on ``mode``, one-shot or in the pool; it
    raises unless the command succeeded and every write of it landed."""
    spec = SandboxSpec.from_options({"working_dir": work, "writes": writes})

    def run(argv: list[str]):
        result = run_command_isolated(argv, spec, mode=mode, reuse=reuse)
        if not result.success:
            raise RuntimeError(f"benchmark command failed ({mode}, {writes}): {result}\n"
                             f"{result.stderr[-2000:] if result.stderr else ''}")
        if result.writes is not None and (result.writes.lost or result.writes.held()):
            raise RuntimeError(f"writes not all applied ({mode}, {writes}): "
                             f"{result.writes.describe()}")
        return result
    return run


def method_table(docker: bool, pool: bool) -> dict[str, tuple[str, str, bool]]:
    """name -> (backend, writes, reuse)."""
    table = {}
    backends = (["runsc"] if locate_runsc() else []) + (["docker"] if docker else [])
    for backend in backends:
        for writes in ("direct", "auto"):
            table[f"{backend} {writes} one-shot"] = (backend, writes, False)
        if pool:
            for writes in ("direct", "auto"):
                table[f"{backend} {writes} pool"] = (backend, writes, True)
    return table


def prime(run: Callable) -> None:
    """Start the pool's warm sandbox for a spec: its first call runs one-shot, the second
    starts the warm sandbox it keeps."""
    for _ in range(2):
        run(["true"])


# --- statistics -----------------------------------------------------------------------------


def spread(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    return {"median": statistics.median(values) * scale, "min": min(values) * scale,
            "max": max(values) * scale, "runs": len(values)}


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """a - b round by round (ms)."""
    return spread([x - y for x, y in zip(a, b, strict=True)])


# --- scenarios ------------------------------------------------------------------------------


def writes_nothing(rounds: int, warmup: int, docker: bool) -> dict:
    work = tempfile.mkdtemp(prefix="gvm-bench-writes-")
    for index in range(10):
        with open(os.path.join(work, f"file{index}.txt"), "w") as handle:
            handle.write(f"{index}\n")
    out = {}
    try:
        table = {name: command_runner(*how[:2], work, reuse=how[2])
                 for name, how in method_table(docker, pool=True).items()}
        for name, run in table.items():
            if "pool" in name:
                prime(run)
        for label, argv in NOTHING.items():
            wall: dict[str, list[float]] = {name: [] for name in table}
            host: dict[str, list[float]] = {name: [] for name in table}
            for index in range(warmup + rounds):
                for name, run in table.items():
                    PROBE.reset()
                    start = time.perf_counter()
                    run(argv)
                    elapsed = time.perf_counter() - start
                    if index >= warmup:
                        wall[name].append(elapsed)
                        host[name].append(PROBE.spent.get("take_writes", 0.0))
            row = {"wall_ms": {n: spread(v) for n, v in wall.items()},
                   "take_writes_ms": {n: spread(v) for n, v in host.items() if "auto" in n},
                   "auto_minus_direct_ms": {}}
            for backend in ("runsc", "docker"):
                for kind in ("one-shot", "pool"):
                    a, d = f"{backend} auto {kind}", f"{backend} direct {kind}"
                    if a in wall and d in wall:
                        row["auto_minus_direct_ms"][f"{backend} {kind}"] = paired(wall[a],
                                                                                  wall[d])
            out[label] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _stamp_gap(result) -> float | None:
    """Seconds from the command's last line (its end, ``time.time_ns()`` inside) to the host
    noting the sandbox ended."""
    try:
        stamp = int(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError, AttributeError):
        return None
    if PROBE.ended_ns is None:
        return None
    return (PROBE.ended_ns - stamp) / 1e9


def writes_files(rounds: int, warmup: int, docker: bool, argv_for: Callable[[int], list[str]],
                 *, size_bytes: int | None = None, pool: bool = True) -> dict:
    """One-shot methods in a fresh working dir per run; pool methods in one working dir per
    method (a warm sandbox is kept per working dir); each run writes into a new subdir."""
    base = tempfile.mkdtemp(prefix="gvm-bench-writes-")
    table = method_table(docker, pool=pool)
    names = list(table)
    pool_dirs = {n: tempfile.mkdtemp(dir=base) for n in names if table[n][2]}
    for name, work in pool_dirs.items():
        prime(command_runner(*table[name][:2], work, reuse=True))
    wall = {n: [] for n in names}
    gap = {n: [] for n in names}
    steps = {n: {s: [] for s in Probe.STEPS} for n in names if "auto" in n}
    try:
        for index in range(warmup + rounds):
            for name in names:
                mode, writes, reuse = table[name]
                work = pool_dirs[name] if reuse else tempfile.mkdtemp(dir=base)
                run = command_runner(mode, writes, work, reuse=reuse)
                PROBE.reset()
                start = time.perf_counter()
                result = run(argv_for(index))
                elapsed = time.perf_counter() - start
                if size_bytes is not None and os.path.getsize(
                        os.path.join(work, f"r{index}", "big")) != size_bytes:
                    raise RuntimeError(f"{name}: the big file did not land whole")
                if index >= warmup:
                    wall[name].append(elapsed)
                    g = None if reuse else _stamp_gap(result)
                    if g is not None:
                        gap[name].append(g)
                    if name in steps:
                        for s in Probe.STEPS:
                            steps[name][s].append(PROBE.spent.get(s, 0.0))
                shutil.rmtree(os.path.join(work, f"r{index}") if reuse else work,
                              ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out: dict = {"wall_ms": {n: spread(v) for n, v in wall.items()},
                 "end_to_host_gap_ms": {n: spread(v) for n, v in gap.items() if v},
                 "host_steps_ms": {n: {s: spread(v) for s, v in per.items()}
                                   for n, per in steps.items()},
                 "auto_minus_direct_ms": {}, "copy_out_estimate_ms": {}}
    for name, per in steps.items():
        out["host_steps_ms"][name]["detect+classify"] = spread(
            [r + j for r, j in zip(per["read_upper"], per["judge"], strict=True)])
        if size_bytes:
            out.setdefault("apply_MB_per_s", {})[name] = spread(
                [size_bytes / 1e6 / t for t in per["apply"] if t], scale=1.0)
    for mode in ("runsc", "docker"):
        for kind in ("one-shot", "pool"):
            a, d = f"{mode} auto {kind}", f"{mode} direct {kind}"
            if a in wall and d in wall:
                out["auto_minus_direct_ms"][f"{mode} {kind}"] = paired(wall[a], wall[d])
        a, d = f"{mode} auto one-shot", f"{mode} direct one-shot"
        if gap.get(a) and gap.get(d):
            ms = (statistics.median(gap[a]) - statistics.median(gap[d])) * 1000
            out["copy_out_estimate_ms"][mode] = ms
            if size_bytes and ms > 0:
                out.setdefault("copy_out_MB_per_s_estimate", {})[mode] = size_bytes / 1e6 / (
                    ms / 1000)
    return out


COLD = """
import sys, time
start = time.perf_counter()
sys.path.insert(0, {root!r})
from gvisor_magic import SandboxSpec, run_command_isolated
spec = SandboxSpec.from_options({{"working_dir": {work!r}, "writes": {writes!r}}})
r = run_command_isolated(["true"], spec, mode={mode!r}, reuse=False)
assert r.success, r
print(time.perf_counter() - start)
"""


def cold_start(rounds: int, docker: bool) -> dict:
    """A fresh interpreter per run: its first command, in process and as a whole process."""
    work = tempfile.mkdtemp(prefix="gvm-bench-writes-")
    modes = (["runsc"] if locate_runsc() else []) + (["docker"] if docker else [])
    inside: dict[str, list[float]] = {}
    whole: dict[str, list[float]] = {}
    try:
        for index in range(rounds + 1):
            for mode in modes:
                for writes in ("direct", "auto"):
                    name = f"{mode} {writes}"
                    code = COLD.format(root=os.path.abspath(ROOT), work=work, writes=writes,
                                       mode=mode)
                    start = time.perf_counter()
                    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                          text=True, check=True)
                    elapsed = time.perf_counter() - start
                    if index:  # the first round warms the page cache
                        inside.setdefault(name, []).append(float(done.stdout.split()[-1]))
                        whole.setdefault(name, []).append(elapsed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out: dict = {"first_command_in_process_ms": {n: spread(v) for n, v in inside.items()},
                 "whole_process_ms": {n: spread(v) for n, v in whole.items()},
                 "auto_over_direct": {}}
    for mode in modes:
        a, d = whole[f"{mode} auto"], whole[f"{mode} direct"]
        out["auto_over_direct"][mode] = spread([x / y for x, y in zip(a, d, strict=True)],
                                               scale=1.0)
    # HostContext.current(), computed once per process: its first call, alone.
    first = []
    caches = [f for f in vars(activity).values() if callable(getattr(f, "cache_clear", None))]
    for _ in range(max(5, rounds)):
        for function in caches:  # computed once per process (per PATH, import path...)
            function.cache_clear()
        start = time.perf_counter()
        activity.HostContext.current()
        first.append(time.perf_counter() - start)
    out["HostContext.current() first call ms"] = spread(first)
    return out


# --- output ---------------------------------------------------------------------------------


def row(name: str, s: dict, unit: str = "ms") -> str:
    fmt = ".1f" if unit == "ms" else ".2f" if unit == "x" else ".0f"
    return (f"  {name:<56}{format(s['median'], fmt):>10}{format(s['min'], fmt):>10}"
            f"{format(s['max'], fmt):>10}  {unit}")


HEAD = f"  {'':<56}{'median':>10}{'min':>10}{'max':>10}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_report(report: dict, args) -> None:
    print(f"held writes vs direct: {args.quick_rounds} rounds (writes nothing), {args.rounds} "
          f"(small files, cold start), {args.big_rounds} (big file), interleaved; "
          f"{os.cpu_count()} cores; times in ms unless marked")
    targets = []
    for label, data in report.get("writes nothing", {}).items():
        print(f"\n[1] writes nothing: {label}\n{HEAD}")
        for name, s in data["wall_ms"].items():
            print(row(name, s))
        for name, s in data["take_writes_ms"].items():
            print(row(f"{name}: of which take_writes", s))
        for name, s in data["auto_minus_direct_ms"].items():
            print(row(f"auto - direct ({name}), paired", s))
            targets.append(f"writes nothing ({label}, {name}): auto {s['median']:+.1f} ms "
                           f"(target <= +5 ms): {verdict(s['median'] <= 5)}")
    for key, number, title in (("small files", 2, f"{args.files} new small files"),
                               ("big file", 3, f"one {args.big_mb} MB file")):
        data = report.get(key)
        if not data:
            continue
        print(f"\n[{number}] {title}\n{HEAD}")
        for name, s in data["wall_ms"].items():
            print(row(f"{name} (whole command)", s))
        for name, s in data["auto_minus_direct_ms"].items():
            print(row(f"auto - direct ({name}), paired", s))
        for name, per in data["host_steps_ms"].items():
            for step, s in per.items():
                print(row(f"{name}: host {step}", s))
            if key == "small files":
                s = per["detect+classify"]
                targets.append(f"{args.files} files ({name}): read_upper + judge "
                               f"{s['median']:.0f} ms (target <= 100 ms): "
                               f"{verdict(s['median'] <= 100)}")
        for name, s in data["end_to_host_gap_ms"].items():
            print(row(f"{name}: command's end -> host sees the end", s))
        for mode, ms in data["copy_out_estimate_ms"].items():
            print(f"  {mode} one-shot: in-sandbox kill + copy-out (auto gap - direct gap) "
                  f"~{ms:.0f} ms")
        for name, s in data.get("apply_MB_per_s", {}).items():
            print(row(f"{name}: changes.apply throughput", s, "MB/s"))
            targets.append(f"{args.big_mb} MB ({name}): apply {s['median']:.0f} MB/s "
                           f"(target >= 200 MB/s): {verdict(s['median'] >= 200)}")
        for mode, v in data.get("copy_out_MB_per_s_estimate", {}).items():
            print(f"  {mode} one-shot: in-sandbox copy-out throughput ~{v:.0f} MB/s")
    cold = report.get("cold start")
    if cold:
        print(f"\n[4] cold start: a fresh process running one `true` one-shot\n{HEAD}")
        for name, s in cold["first_command_in_process_ms"].items():
            print(row(f"{name}: first command, in process", s))
        for name, s in cold["whole_process_ms"].items():
            print(row(f"{name}: whole process", s))
        for name, s in cold["auto_over_direct"].items():
            print(row(f"{name}: auto / direct, whole process, paired", s, "x"))
            targets.append(f"cold start ({name}): auto / direct {s['median']:.2f} "
                           f"(target <= 1.10): {verdict(s['median'] <= 1.10)}")
        print(row("HostContext.current() first call", cold["HostContext.current() first call ms"]))
    print("\ntargets (medians)")
    for line in targets:
        print(f"  {line}")


def main() -> int:
    global PROBE
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the small-files and cold-start scenarios")
    parser.add_argument("--quick-rounds", type=int, default=8,
                        help="rounds of the writes-nothing scenario (noisier, cheaper)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--big-mb", type=int, default=500)
    parser.add_argument("--big-rounds", type=int, default=3)
    parser.add_argument("--big-pool", action="store_true",
                        help="the big file in the warm pool too (one-shot only by default)")
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--only", choices=("nothing", "files", "big", "cold"), action="append",
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not locate_runsc():
        raise SystemExit("runsc not found: nothing to measure")
    PROBE = Probe()
    docker = not args.no_docker and docker_usable()
    only = set(args.only or ("nothing", "files", "big", "cold"))
    files = args.files

    def files_argv(index: int) -> list[str]:
        return ["python3", "-c",
                f"import os, time\nos.mkdir('r{index}')\nfor i in range({files}):\n"
                f"    with open(f'r{index}/f{{i:04d}}.txt', 'w') as h: h.write('small %d\\n' % i)\n"
                "print(time.time_ns())"]

    def big_argv(index: int) -> list[str]:
        return ["sh", "-c", f"mkdir r{index} && head -c {args.big_mb * 1000 * 1000} "
                f"/dev/zero > r{index}/big && date +%s%N"]

    scenarios = {
        "writes nothing": ("nothing", lambda: writes_nothing(args.quick_rounds, args.warmup,
                                                             docker)),
        "small files": ("files", lambda: writes_files(args.rounds, args.warmup, docker,
                                                      files_argv)),
        "big file": ("big", lambda: writes_files(args.big_rounds, 0, docker, big_argv,
                                                 size_bytes=args.big_mb * 1000 * 1000,
                                                 pool=args.big_pool)),
        "cold start": ("cold", lambda: cold_start(args.rounds, docker)),
    }
    report: dict = {}
    for key, (short, measure) in scenarios.items():
        if short in only:
            try:
                report[key] = measure()
            except Exception as exc:  # report the others all the same
                print(f"({key} failed: {type(exc).__name__}: {exc})", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
