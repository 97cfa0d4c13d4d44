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
- **one-shot**: ``run_command_isolated(argv)`` and **``runsc do``** for the same argv.

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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gvisor_magic import IsolatedSession, run_command_isolated
from gvisor_magic.backends.runsc import locate_runsc

PROGRAMS = {
    "/bin/true": ["/bin/true"],
    "ls /": ["ls", "/"],
    "git status": ["git", "status", "--short"],
    "python3 -c pass": ["python3", "-c", "pass"],
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


def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    work = small_repo()
    runsc = locate_runsc()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in PROGRAMS}
    sh = IsolatedSession(work, mode="runsc", shell="/bin/sh")
    bash = IsolatedSession(work, mode="runsc", shell=shutil.which("bash") or "/bin/sh")
    try:
        sh.start()
        bash.start()
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
                    elapsed = time.perf_counter() - start
                    if getattr(result, "returncode", 0) != 0:
                        raise SystemExit(f"{label} {name} failed: {result}")
                    got.setdefault(label, []).append(elapsed)

                timed("warm argv, spaced", lambda a=argv: sh.run(a), PAUSE)
                timed("warm argv, back to back", lambda a=argv: sh.run(a))
                timed("warm bash cell, spaced", lambda c=line: bash.run(c), PAUSE)
                timed("one-shot run_command_isolated",
                      lambda a=argv: run_command_isolated(a, mode="runsc", working_dir=work))
                if runsc:
                    timed("runsc do", lambda a=argv: subprocess.run(
                        [runsc, "--network=none", "--ignore-cgroups", "do", *a], cwd=work,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for got in samples.values():
            for label in got:
                got[label] = got[label][1:]
    finally:
        sh.close()
        bash.close()
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
