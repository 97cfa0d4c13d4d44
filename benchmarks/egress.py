#!/usr/bin/env python3
"""Egress throughput: a download through a warm runsc session's proxy.

A loopback HTTP server (in this process, 127.0.0.1 only) serves ``--megabytes``
MiB; a warm session whose network allows exactly that server (``network=
["127.0.0.1:PORT"]``, what ``--allow-host`` adds) runs ``curl`` to fetch it
through the sandbox's relay, its channel and the host's proxy, writing it to
``/dev/null``. Reported per code tree, per download (medians over ``--rounds``):
MB/s, the host CPU time (user + system) of the process that holds the session,
and that of its proxies' event-loop thread alone (``gvisor-magic-egress``, where
the host's end of the channel and the proxy run).

Each tree (``--tree DIR``, repeatable; this checkout by default) runs in a
worker process of its own (``PYTHONPATH=DIR``), with its own warm session, and
the driver interleaves the rounds between the workers (their order alternates
from round to round), so machine drift and other load hit every tree alike. To
compare with a commit, check it out next to this one (``git worktree add
/tmp/before COMMIT``) and pass both trees; the server and the driver's CPU are
not counted. Prints a table; ``--json`` for JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MB = 1024 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
_BLOCK = b"x" * MB
#: The proxies' event-loop thread (``gvisor_magic.egress.proxy._Loop``).
LOOP_THREAD = "gvisor-magic-egress"


@contextlib.contextmanager
def blob_server(size: int) -> Iterator[str]:
    """A loopback server answering every GET with ``size`` bytes; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("Connection", "close")
            self.end_headers()
            left = size
            with contextlib.suppress(OSError):
                while left:
                    self.wfile.write(_BLOCK[:min(left, MB)])
                    left -= min(left, MB)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True, name="blob-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/blob"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# -- the worker: one tree, one warm session ------------------------------------------------


def thread_cpu(name: str) -> float:
    """CPU seconds (user + system) of this process's thread called ``name`` so far."""
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def worker(tree: str, url: str, size: int) -> int:
    """Serve ``run`` lines on stdin with one download each; a JSON line per answer."""
    sys.path.insert(0, tree)
    import gvisor_magic
    from gvisor_magic import IsolatedSession

    authority = url.split("/")[2]
    command = f"curl -sS --max-time 600 -o /dev/null -w '%{{size_download}}' {url}"
    with tempfile.TemporaryDirectory(prefix="gvm-bench-egress-") as work, \
            IsolatedSession(work, mode="runsc", network=[authority]) as session:
        session.start()
        print(json.dumps({"ready": gvisor_magic.__file__}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            loop, cpu, wall = (thread_cpu(LOOP_THREAD), time.process_time(),
                               time.perf_counter())
            result = session.run(command, timeout=600)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            loop = thread_cpu(LOOP_THREAD) - loop
            got = result.stdout.strip()
            if not result.success or result.backend != "runsc" or got != str(size):
                print(json.dumps({"error": f"{result.describe()} got {got!r}: "
                                           f"{result.stderr[-500:]}"}), flush=True)
                return 1
            print(json.dumps({"seconds": wall, "cpu": cpu, "loop_cpu": loop}), flush=True)
    return 0


class Worker:
    def __init__(self, tree: str, url: str, size: int) -> None:
        self.tree = os.path.abspath(tree)
        env = dict(os.environ, PYTHONPATH=self.tree)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", self.tree, "--url", url,
             "--bytes", str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self._answer()
        if not ready.get("ready", "").startswith(self.tree + os.sep):
            raise SystemExit(f"{self.tree}: its worker imported {ready}")

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.tree}: its worker ended (exit {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"{self.tree}: {answer['error']}")
        return answer

    def run(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(trees: list[str], size: int, rounds: int, warmup: int) -> dict[str, dict]:
    samples: dict[str, dict[str, list[float]]] = {
        tree: {"seconds": [], "cpu": [], "loop_cpu": []} for tree in trees}
    with blob_server(size) as url:
        workers: list[Worker] = []
        try:
            for tree in trees:
                workers.append(Worker(tree, url, size))
            for index in range(warmup + rounds):
                order = workers if index % 2 == 0 else workers[::-1]
                for each in order:
                    answer = each.run()
                    if index >= warmup:
                        samples[each.tree]["seconds"].append(answer["seconds"])
                        samples[each.tree]["cpu"].append(answer["cpu"])
                        samples[each.tree]["loop_cpu"].append(answer["loop_cpu"])
        finally:
            for each in workers:
                each.close()
    out = {}
    for tree, values in samples.items():
        out[tree] = {"mb_per_s": size / 1e6 / statistics.median(values["seconds"]),
                     "cpu_s": statistics.median(values["cpu"]),
                     "loop_cpu_s": statistics.median(values["loop_cpu"]),
                     "mb_per_s_each": [round(size / 1e6 / s, 1) for s in values["seconds"]],
                     "cpu_s_each": [round(c, 3) for c in values["cpu"]],
                     "loop_cpu_s_each": [round(c, 3) for c in values["loop_cpu"]]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", help="a checkout to measure (repeatable)")
    parser.add_argument("--megabytes", type=int, default=200, help="MiB per download")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.url, args.bytes)
    trees = args.tree or [os.path.dirname(HERE)]
    size = args.megabytes * MB
    results = measure(trees, size, args.rounds, args.warmup)
    if args.json:
        print(json.dumps({"megabytes": args.megabytes, "rounds": args.rounds,
                          "trees": results}, indent=2))
        return 0
    print(f"{args.megabytes} MiB downloaded by curl in a warm runsc session through its "
          f"proxy   ({args.rounds} interleaved rounds, {os.cpu_count()} cores)")
    print(f"{'tree':<32}{'MB/s':>7}{'CPU s':>8}{'loop CPU s':>12}   "
          "each round: MB/s; CPU s; loop CPU s")
    for tree, row in results.items():
        print(f"{tree:<32}{row['mb_per_s']:>7.1f}{row['cpu_s']:>8.2f}{row['loop_cpu_s']:>12.2f}"
              f"   {row['mb_per_s_each']}; {row['cpu_s_each']}; {row['loop_cpu_s_each']}")
    print("\nMB/s: 10^6 bytes per second; CPU s: user + system time of the process holding "
          "the session; loop CPU s: of its proxies' event-loop thread alone; per download, "
          "medians")
    return 0


if __name__ == "__main__":
    sys.exit(main())
