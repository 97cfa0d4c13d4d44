"""Run the hostile-probe suite and the fault tests; print probe x backend -> blocked / LEAKED.

The table is built from the tests' own verdicts (``Probe.verdict`` in
tests/support/probes.py stores them in each report's ``user_properties``),
never from a list kept here: a probe that did not run shows as missing.

    python scripts/security_report.py [--json FILE] [-- extra pytest args]

Exit status: 0 when every probe is blocked on runsc and Docker and every fault
test passed, 1 otherwise (including when tests were skipped in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [(b, f) for b in ("runsc", "docker", "subprocess")
           for f in ("one-shot", "reused", "session") if (b, f) != ("subprocess", "reused")]
# Fault handling lives partly in the older test modules; the report covers them too.
FAULT_TESTS = [
    "tests/security/test_faults.py",
    "tests/test_fallback.py::test_sandbox_killed_mid_command_is_reported_not_rerun",
    "tests/test_session.py::test_a_dead_sandbox_is_reported_and_replaced_without_a_rerun",
    "tests/test_docker_faults.py::test_dockerd_dying_mid_command_is_reported_not_rerun",
    "tests/test_session.py::test_threads_share_a_session_safely",
    "tests/test_session.py::test_two_hundred_commands_leak_nothing",
    # A command cannot write into the agent's channel; garbage that reaches the host anyway
    # (a broken agent) ends that sandbox cleanly.
    "tests/security/test_agent_sealed.py",
    "tests/unit/test_fakes.py",
]


class Recorder:
    """A pytest plugin keeping every probe verdict and every test's outcome."""

    def __init__(self) -> None:
        self.verdicts: list[dict] = []
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        entry = self.tests.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
        if report.failed:
            entry["outcome"] = "failed"
            entry["reason"] = str(report.longrepr).strip().splitlines()[-1][:200]
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            entry["reason"] = str(reason).removeprefix("Skipped: ")[:200]
        if report.when == "call" or report.skipped:
            for key, value in report.user_properties:
                if key == "security" and value not in self.verdicts:
                    self.verdicts.append({**value, "test": report.nodeid})


def cell(entries: list[dict]) -> str:
    if not entries:
        return "—"
    outcomes = {e["outcome"] for e in entries}
    if "LEAKED" in outcomes:
        return "**LEAKED**"
    return "blocked" if outcomes == {"blocked"} else sorted(outcomes)[0]


def render(recorder: Recorder) -> tuple[str, int, int]:
    rows: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for verdict in recorder.verdicts:
        rows[verdict["probe"]][(verdict["backend"], verdict["flavour"])].append(verdict)
    head = "| probe | " + " | ".join(f"{b} {f}" for b, f in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for probe, by_column in rows.items():
        lines.append(f"| {probe} | " + " | ".join(cell(by_column.get(c, [])) for c in COLUMNS)
                     + " |")
    totals = defaultdict(lambda: defaultdict(int))
    for verdict in recorder.verdicts:
        totals[verdict["backend"]][verdict["outcome"]] += 1
    lines.append("")
    for backend in ("runsc", "docker", "subprocess"):
        counts = totals[backend]
        lines.append(f"- {backend}: " + (", ".join(f"{counts[o]} {o}" for o in
                                                   ("blocked", "LEAKED", "n/a") if counts[o])
                                         or "no probe ran"))
    gvisor_leaks = sum(totals[b]["LEAKED"] for b in ("runsc", "docker"))
    gvisor_probes = sum(sum(totals[b].values()) for b in ("runsc", "docker"))
    return "\n".join(lines), gvisor_leaks, gvisor_probes


def render_faults(recorder: Recorder) -> tuple[str, int]:
    lines = ["| fault test | outcome |", "| --- | --- |"]
    bad = 0
    for nodeid, entry in recorder.tests.items():
        if not any(nodeid.startswith(f) for f in FAULT_TESTS):
            continue
        outcome = {"passed": "handled", "failed": "**FAILED**", "skipped": "n/a"}[
            entry["outcome"]]
        bad += entry["outcome"] == "failed"
        note = f" ({entry['reason']})" if entry["outcome"] != "passed" else ""
        lines.append(f"| `{nodeid}` | {outcome}{note} |")
    return "\n".join(lines), bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every verdict and test outcome here")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    recorder = Recorder()
    started = time.monotonic()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/security", *FAULT_TESTS[1:],
                        *args.pytest_args], plugins=[recorder])
    elapsed = time.monotonic() - started
    table, leaks, probes = render(recorder)
    faults, broken = render_faults(recorder)
    print(f"\n## Probes ({len(recorder.verdicts)} verdicts, {elapsed:.0f} s)\n")
    print(table)
    print("\n## Faults\n")
    print(faults)
    status = "PASS" if code == 0 and leaks == 0 and broken == 0 and probes else "FAIL"
    print(f"\n{status}: {leaks} leak(s) in {probes} gVisor probe runs, {broken} fault test(s) "
          f"failed, pytest exit {int(code)}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"verdicts": recorder.verdicts, "tests": recorder.tests}, indent=1))
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
