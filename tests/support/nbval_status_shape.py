"""A pytest plugin for the fallback nbval run: compare a cell's gvisor-magic status as one thing.

The saved outputs come from gVisor, where a command that went as asked shows its status as
a quiet badge (``display_data``). On the fallback the same command ran on the host, which
needs attention, so its status is a WARNING line on stderr: by design a different shape.
This plugin turns both into one ``gvisor-magic status`` entry holding ``<where>: <end>``
before nbval compares, so everything else in the cell is still compared strictly and the
status itself still has to say how the command ended. Only the fallback run loads it
(``-p nbval_status_shape``): with gVisor, a status on stderr where a badge was saved fails.
"""

from __future__ import annotations

import re

import nbformat
from nbval.plugin import IPyNbCell

STATUS_LINE = re.compile(r"^\[gvisor-magic\] (?:WARNING: )?(\w+ \((?:gVisor|NOT isolated)\): "
                         r"(?:exit -?\d+|timed out|killed by \w+))[^\n]*\n?", re.M)
KEY = "gvisor-magic status"


def canonical(outputs):
    statuses, kept = [], []
    for output in outputs:
        data = output.get("data", {})
        if output.get("output_type") == "display_data" and "gvisor-magic-badge" in data.get(
                "text/html", ""):
            statuses.append(STATUS_LINE.match(data["text/plain"] + "\n").group(1))
            continue
        if output.get("output_type") == "stream" and output.get("name") == "stderr":
            text = output["text"]
            statuses += STATUS_LINE.findall(text)
            text = STATUS_LINE.sub("", text)
            if not text:
                continue
            output = nbformat.from_dict({**output, "text": text})
        kept.append(output)
    if statuses:
        kept.append(nbformat.from_dict({"output_type": "display_data", "metadata": {},
                                        "data": {KEY: "\n".join(statuses)}}))
    return kept


def pytest_configure(config) -> None:
    compare = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        return compare(self, canonical(test), canonical(ref), skip_compare)

    IPyNbCell.compare_outputs = compare_outputs
