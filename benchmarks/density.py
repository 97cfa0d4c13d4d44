#!/usr/bin/env python3
"""Density: N warm sessions on one host, like N notebook kernels on one JupyterHub node.

Starts ``--sessions`` warm sessions of one ``--mode`` (runsc or docker), then
measures:

* memory per idle session: the summed RSS (and PSS, which splits pages shared
  between processes, such as runsc's own binary) of the host processes that
  serve each session: those whose command line carries the session's
  ``sandbox_id`` (runsc: ``runsc run`` and runsc-sandbox; docker: the
  containerd shim and runsc-sandbox) and their descendants (runsc-gofer, the
  sandbox's stub processes);
  also the growth of the host's used memory divided by N, which includes what
  no process owns (the sandboxes' page tables and the daemons' bookkeeping);
* the latency of ``true``: one session alone (the others idle) against all N
  sessions running commands at once from N threads, and the ratio of the medians.

Prints a table; ``--json`` for JSON. Every session is closed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gvisor_magic import IsolatedSession, IsolationUnavailable

MB = 1024 * 1024
SETTLE = 1.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_true(session: IsolatedSession) -> float:
    start = time.perf_counter()
    result = session.run("true")  # the shell command, as latency.py measures it
    elapsed = time.perf_counter() - start
    if not result.success or result.backend != session.backend:
        raise SystemExit(f"`true` failed in session {session.sandbox_id}: {result.describe()}")
    return elapsed


def _kind(cmdline: list[str]) -> str:
    """A short name for a serving process: runsc, runsc-sandbox, runsc-gofer, shim, ...

    The sandbox's children without a command line are its platform's stub
    processes (systrap), which host the guest's address spaces.
    """
    if not cmdline:
        return "stubs (no cmdline)"
    name = os.path.basename(cmdline[0])
    return "shim" if name.startswith("containerd-shim") else name


def serving_processes(sandbox_id: str) -> list[psutil.Process]:
    """Host processes whose command line carries ``sandbox_id``, and their descendants."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(sandbox_id in part for part in cmdline):
            found[process.pid] = process
    for process in list(found.values()):
        try:
            for child in process.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return list(found.values())


def session_memory(session: IsolatedSession) -> dict:
    rss = pss = 0
    kinds: dict[str, float] = {}
    processes = serving_processes(session.sandbox_id or "")
    for process in processes:
        try:
            info = process.memory_full_info()
            kind = _kind(process.cmdline())
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
        kinds[kind] = kinds.get(kind, 0) + info.rss / MB
    return {"rss_mb": rss / MB, "pss_mb": pss / MB, "processes": len(processes),
            "pids": sorted(p.pid for p in processes), "rss_mb_by_process": kinds}


def concurrent_latency(sessions: list[IsolatedSession], commands: int, warmup: int
                       ) -> tuple[list[float], float]:
    """Every session runs ``commands`` times ``true`` from its own thread, all at once."""
    barrier = threading.Barrier(len(sessions))
    samples: list[list[float]] = [[] for _ in sessions]
    errors: list[BaseException] = []
    started = [0.0]

    def worker(index: int) -> None:
        try:
            for _ in range(warmup):
                run_true(sessions[index])
            if barrier.wait() == 0:
                started[0] = time.perf_counter()
            samples[index] = [run_true(sessions[index]) for _ in range(commands)]
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), name=f"density-{i}")
               for i in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started[0]
    if errors:
        raise SystemExit(f"concurrent commands failed: {errors[0]!r}")
    return [value for values in samples for value in values], wall


def leftovers(sandbox_ids: list[str]) -> list[str]:
    """Command lines of processes still carrying a closed session's id."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(sid in part for part in cmdline for sid in sandbox_ids):
            found.append(f"{process.pid}: {' '.join(cmdline)[:160]}")
    return found


def measure(args: argparse.Namespace) -> dict:
    work = tempfile.mkdtemp(prefix="gvm-bench-")
    sessions: list[IsolatedSession] = []
    used_before = psutil.virtual_memory().used
    try:
        start_times = []
        for _ in range(args.sessions):
            session = IsolatedSession(work, mode=args.mode)
            sessions.append(session)
            start = time.perf_counter()
            try:
                session.start()
            except IsolationUnavailable as exc:
                raise SystemExit(f"cannot start a warm {args.mode} session: {exc}") from exc
            start_times.append(time.perf_counter() - start)
            if session.backend != args.mode or not session.sandbox_id:
                raise SystemExit(f"session is not warm on {args.mode}: state={session.state}, "
                                 f"{session.cold_reason}")
        for session in sessions:  # the agent has run a command: a kernel's idle state
            run_true(session)
        time.sleep(SETTLE)
        memory = {session.sandbox_id: session_memory(session) for session in sessions}
        used_growth = (psutil.virtual_memory().used - used_before) / MB
        pids = [pid for row in memory.values() for pid in row["pids"]]
        if len(pids) != len(set(pids)):
            raise SystemExit("a host process was attributed to two sessions")
        if any(row["processes"] == 0 for row in memory.values()):
            raise SystemExit("no host process found for a session")

        alone = sessions[0]
        for _ in range(args.warmup):
            run_true(alone)
        single = [run_true(alone) for _ in range(args.single_runs)]
        together, wall = concurrent_latency(sessions, args.commands, args.warmup)
    finally:
        ids = [s.sandbox_id for s in sessions if s.sandbox_id]
        close_start = time.perf_counter()
        for session in sessions:
            session.close()
        close_seconds = time.perf_counter() - close_start
        shutil.rmtree(work, ignore_errors=True)
        remaining = leftovers(ids)
        if remaining:
            print("processes left after closing the sessions:\n  " + "\n  ".join(remaining),
                  file=sys.stderr)
    rss = [row["rss_mb"] for row in memory.values()]
    pss = [row["pss_mb"] for row in memory.values()]
    kinds: dict[str, float] = {}
    for row in memory.values():
        for kind, value in row["rss_mb_by_process"].items():
            kinds[kind] = kinds.get(kind, 0) + value / len(memory)
    single_median = statistics.median(single)
    together_median = statistics.median(together)
    return {
        "mode": args.mode, "sessions": args.sessions, "cores": os.cpu_count(),
        "start_s": {"median": statistics.median(start_times), "total": sum(start_times)},
        "memory": {
            "rss_mb_per_session": {"median": statistics.median(rss), "min": min(rss),
                                   "max": max(rss)},
            "rss_mb_total": sum(rss),
            "pss_mb_per_session": statistics.median(pss), "pss_mb_total": sum(pss),
            "processes_per_session": statistics.median(r["processes"] for r in memory.values()),
            "rss_mb_by_process_mean": kinds,
            "host_used_growth_mb": used_growth,
            "host_used_growth_mb_per_session": used_growth / args.sessions,
            "per_session": {sid: {k: v for k, v in row.items() if k != "pids"}
                            for sid, row in memory.items()},
        },
        "latency_ms": {
            "single": {"median": single_median * 1000, "p95": percentile(single, 0.95) * 1000,
                       "runs": len(single)},
            "concurrent": {"median": together_median * 1000,
                           "p95": percentile(together, 0.95) * 1000, "runs": len(together),
                           "commands_per_s": len(together) / wall},
            "ratio_concurrent_over_single_median": together_median / single_median,
        },
        "close_s_total": close_seconds,
        "leftover_processes": remaining,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--mode", choices=("runsc", "docker"), default="runsc")
    parser.add_argument("--single-runs", type=int, default=30,
                        help="`true` runs of one session alone")
    parser.add_argument("--commands", type=int, default=20,
                        help="`true` runs per thread when all sessions run at once")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    report = measure(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        memory, latency = report["memory"], report["latency_ms"]
        n = args.sessions
        print(f"{n} warm {args.mode} sessions   ({report['cores']} cores; start median "
              f"{report['start_s']['median'] * 1000:.0f} ms, all {report['start_s']['total']:.1f} s"
              f"; close all {report['close_s_total']:.1f} s)")
        print(f"\n{'idle memory':<36}{'per session MB':>16}{'total MB':>12}")
        rss = memory["rss_mb_per_session"]
        print(f"{'RSS of serving processes (median)':<36}{rss['median']:>16.1f}"
              f"{memory['rss_mb_total']:>12.1f}")
        print(f"{'  (min / max per session)':<36}{rss['min']:>7.1f} / {rss['max']:<6.1f}")
        for kind, value in sorted(memory["rss_mb_by_process_mean"].items()):
            print(f"{'  RSS of ' + kind + ' (mean)':<36}{value:>16.1f}{value * n:>12.1f}")
        print(f"{'PSS of serving processes (median)':<36}{memory['pss_mb_per_session']:>16.1f}"
              f"{memory['pss_mb_total']:>12.1f}")
        print(f"{'host used memory growth':<36}{memory['host_used_growth_mb_per_session']:>16.1f}"
              f"{memory['host_used_growth_mb']:>12.1f}")
        print(f"\n{'latency of `true`':<36}{'median ms':>12}{'p95 ms':>10}{'runs':>8}")
        for label, key in (("1 session alone", "single"),
                           (f"{n} sessions at once, {n} threads", "concurrent")):
            row = latency[key]
            print(f"{label:<36}{row['median']:>12.1f}{row['p95']:>10.1f}{row['runs']:>8}")
        print(f"ratio concurrent / single median: "
              f"{latency['ratio_concurrent_over_single_median']:.2f}   (all sessions together: "
              f"{latency['concurrent']['commands_per_s']:.0f} commands/s)")
    return 1 if report["leftover_processes"] else 0


if __name__ == "__main__":
    sys.exit(main())
