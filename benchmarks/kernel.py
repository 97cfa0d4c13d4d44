#!/usr/bin/env python3
"""What "Python 3 (gVisor)" costs against a normal ipykernel, measured in one run.

For each kernel, interleaved round by round: **start** (``start_kernel`` until the first
``execute_reply`` of a trivial cell, as a notebook's first run waits), **cell round trip**
(``execute`` of ``pass`` to its reply, of ``!true``, a shell escape that starts a
program, and of a cell writing a CSV), and **shutdown**. The gVisor kernel runs twice: with
its writes held cell by cell (``auto``, the default) and with ``writes: direct``. Prints
medians; ``--json`` for JSON.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from gvisor_magic.kernel import KERNEL_NAME
from gvisor_magic.kernel.kernelspec import kernel_json

CELLS = {"cell `pass`": "pass", "cell `!true`": "!true",
         "cell writing a CSV": "open('bench.csv', 'w').write('a,b\\n1,2\\n')"}
GVISOR_DIRECT = "Python 3 (gVisor), writes direct"


def managers(specs: str) -> dict[str, KernelManager]:
    for name, spec in (("ipykernel", {"argv": [sys.executable, "-m", "ipykernel_launcher",
                                               "-f", "{connection_file}"],
                                      "display_name": "bench", "language": "python"}),
                       (KERNEL_NAME, kernel_json()),
                       (KERNEL_NAME + "-direct", kernel_json({"writes": "direct"}))):
        os.makedirs(os.path.join(specs, name), exist_ok=True)
        with open(os.path.join(specs, name, "kernel.json"), "w") as handle:
            json.dump(spec, handle)
    found = KernelSpecManager(kernel_dirs=[specs])
    return {"normal ipykernel": KernelManager(kernel_name="ipykernel",
                                              kernel_spec_manager=found),
            "Python 3 (gVisor)": KernelManager(kernel_name=KERNEL_NAME,
                                               kernel_spec_manager=found),
            GVISOR_DIRECT: KernelManager(kernel_name=KERNEL_NAME + "-direct",
                                         kernel_spec_manager=found)}


def one_round(km: KernelManager, work: str, cells: int) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {}
    start = time.perf_counter()
    km.start_kernel(cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=180)
        reply = kc.execute_interactive("pass", timeout=120)
        assert reply["content"]["status"] == "ok", reply
        got["start to first execute_reply"] = [time.perf_counter() - start]
        for label, code in CELLS.items():
            for _ in range(cells):
                began = time.perf_counter()
                reply = kc.execute_interactive(code, timeout=120, output_hook=lambda m: None)
                got.setdefault(label, []).append(time.perf_counter() - began)
                assert reply["content"]["status"] == "ok", reply
    finally:
        kc.stop_channels()
        began = time.perf_counter()
        km.shutdown_kernel(now=False)
        got["shutdown"] = [time.perf_counter() - began]
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cells", type=int, default=20, help="cells timed per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    specs = tempfile.mkdtemp(prefix="gvm-bench-kernels-")
    work = tempfile.mkdtemp(prefix="gvm-bench-kernel-work-")
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(args.rounds):
            for name, km in managers(specs).items():
                for label, values in one_round(km, work, args.cells).items():
                    samples.setdefault(name, {}).setdefault(label, []).extend(values)
    finally:
        shutil.rmtree(specs, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: {label: statistics.median(v) for label, v in got.items()}
               for name, got in samples.items()}
    if args.json:
        print(json.dumps(medians, indent=2))
        return 0
    labels = list(next(iter(medians.values())))
    print("| kernel | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    for name, figures in medians.items():
        print(f"| {name} | " + " | ".join(f"{figures[label] * 1000:.0f} ms"
                                          for label in labels) + " |")
    print(f"\nmedians of {args.rounds} interleaved rounds ({args.cells} cells each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
