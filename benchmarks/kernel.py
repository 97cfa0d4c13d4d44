#!/usr/bin/env python3
"""What "Python 3 (gVisor)" costs against a normal ipykernel, measured in one run.

For each kernel, interleaved round by round: **start** (``start_kernel`` until the first
``execute_reply`` of a trivial cell, as a notebook's first run waits), **cell round trip**
(``execute`` of ``pass`` to its reply, of ``!true``, a shell escape that starts a
program, and of a cell writing a CSV), and **shutdown**. The gVisor kernel runs three
times without its pool (``pool: 0``): with its writes held cell by cell (``auto``, the
default) and with ``writes: direct``; and once **from the pool** (the default ``pool: 1``):
its start is a claim of the kernel the pool started ahead of need, which is ready before
the round (its own start is not timed; the replacement the claim starts is let finish
before the cells are timed, so it does not weigh on them). Prints medians; ``--json`` for
JSON.
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
from gvisor_magic.kernel.pool import POOL

CELLS = {"cell `pass`": "pass", "cell `!true`": "!true",
         "cell writing a CSV": "open('bench.csv', 'w').write('a,b\\n1,2\\n')"}
GVISOR_DIRECT = "Python 3 (gVisor), writes direct"
GVISOR_POOLED = "Python 3 (gVisor), from the pool"


def managers(specs: str) -> dict[str, KernelManager]:
    for name, spec in (("ipykernel", {"argv": [sys.executable, "-m", "ipykernel_launcher",
                                               "-f", "{connection_file}"],
                                      "display_name": "bench", "language": "python"}),
                       (KERNEL_NAME, kernel_json({"pool": 0})),
                       (KERNEL_NAME + "-direct", kernel_json({"writes": "direct", "pool": 0})),
                       (KERNEL_NAME + "-pooled", kernel_json({"pool": 1}))):
        os.makedirs(os.path.join(specs, name), exist_ok=True)
        with open(os.path.join(specs, name, "kernel.json"), "w") as handle:
            json.dump(spec, handle)
    found = KernelSpecManager(kernel_dirs=[specs])
    return {"normal ipykernel": KernelManager(kernel_name="ipykernel",
                                              kernel_spec_manager=found),
            "Python 3 (gVisor)": KernelManager(kernel_name=KERNEL_NAME,
                                               kernel_spec_manager=found),
            GVISOR_DIRECT: KernelManager(kernel_name=KERNEL_NAME + "-direct",
                                         kernel_spec_manager=found),
            GVISOR_POOLED: KernelManager(kernel_name=KERNEL_NAME + "-pooled",
                                         kernel_spec_manager=found)}


def pool_settled(seconds: float = 300.0) -> int:
    """Wait until no kernel is being started ahead of need; how many wait for a claim."""
    deadline = time.monotonic() + seconds
    while POOL.starting() and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(POOL.ready())


def one_round(km: KernelManager, work: str, cells: int,
              pooled: bool = False) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {}
    if pooled:
        if not pool_settled():  # the first round: the pool learns the recipe
            first = KernelManager(kernel_name=km.kernel_name,
                                  kernel_spec_manager=km.kernel_spec_manager)
            first.start_kernel(cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first.shutdown_kernel(now=False)
        if not pool_settled():
            raise SystemExit("no kernel was started ahead of need")
    start = time.perf_counter()
    km.start_kernel(cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=180)
        reply = kc.execute_interactive("pass", timeout=120)
        assert reply["content"]["status"] == "ok", reply
        got["start to first execute_reply"] = [time.perf_counter() - start]
        if pooled:
            assert km.provisioner.from_pool, "the kernel did not come from the pool"
            pool_settled()
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
                for label, values in one_round(km, work, args.cells,
                                               pooled=name == GVISOR_POOLED).items():
                    samples.setdefault(name, {}).setdefault(label, []).extend(values)
    finally:
        POOL.close()
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
