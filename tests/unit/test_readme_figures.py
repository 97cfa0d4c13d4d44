"""The performance sentences (docs/performance.md) say what its own table shows.

A ratio quoted in prose is checked against the table it is drawn from, so a rerun that
updates the table without the sentence (or the reverse) fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

PERFORMANCE = Path(__file__).resolve().parents[2] / "docs" / "performance.md"
COLUMNS = ("/bin/true", "ls /", "git status", "python3")


def _programs_table(text: str) -> dict[str, list[float]]:
    start = text.index("| method | `/bin/true` | `ls /` |")
    rows: dict[str, list[float]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = [float(re.match(r"([\d.]+) ms", cell).group(1)) for cell in cells[1:]]
    return rows


def _row(rows: dict[str, list[float]], words: str) -> list[float]:
    [found] = [values for name, values in rows.items() if words in name]
    return found


def test_repeated_one_shot_ratios_are_the_tables() -> None:
    text = PERFORMANCE.read_text()
    rows = _programs_table(text)
    repeated = _row(rows, "one-shot `run_command_isolated`, repeated")
    runsc_do = _row(rows, "peer: `runsc do`")
    sentence = text[text.index("**Repeated one-shot calls cost"):]
    sentence = sentence[:sentence.index("- **")]
    stated = [float(x) for x in re.findall(r"(\d\.\d\d)x", sentence)[:4]]
    expected = [round(a / b, 2) for a, b in zip(repeated, runsc_do, strict=True)]
    assert stated == expected, (stated, expected)


def test_fresh_sandbox_ratio_is_the_tables() -> None:
    text = PERFORMANCE.read_text()
    rows = _programs_table(text)
    fresh = _row(rows, "`reuse=False`")
    runsc_do = _row(rows, "peer: `runsc do`")
    ratios = [a / b for a, b in zip(fresh, runsc_do, strict=True)]
    sentence = text[text.index("**Repeated one-shot calls cost"):]
    low, high = map(float, re.search(r"sandbox: ([\d.]+)\u2013([\d.]+)x `runsc do`",
                                     sentence).groups())
    assert low <= round(min(ratios), 1) and round(max(ratios), 1) <= high, ratios
