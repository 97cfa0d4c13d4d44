"""`make security-report` names the fault tests it runs: each of them must exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_fault_test_the_report_names_exists():
    spec = importlib.util.spec_from_file_location("security_report",
                                                  ROOT / "scripts" / "security_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    missing = []
    for node in report.FAULT_TESTS:
        path, _, name = node.partition("::")
        source = ROOT / path
        if not source.exists() or (name and f"def {name}(" not in source.read_text()):
            missing.append(node)
    assert missing == []
