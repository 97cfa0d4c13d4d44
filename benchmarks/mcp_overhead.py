#!/usr/bin/env python3
"""What the MCP server adds to a command: ``run`` of ``true`` through ``gvisor-magic mcp``
(stdio, the official SDK's client) against a direct ``arun`` of the same command in the same
working dir, interleaved one of each per round. Both reuse a warm sandbox after their first
call, so the difference is the server's: JSON-RPC over its pipes, the schemas' validation,
the result's conversion. Reports the medians and the median of the paired differences.
``--json`` for JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from gvisor_magic import arun


async def measure(rounds: int, work: str) -> dict:
    params = StdioServerParameters(
        command=sys.executable, env=dict(os.environ),
        args=["-m", "gvisor_magic.cli", "mcp", "--workdir", work])
    through, direct, pairs = [], [], []
    with open(os.devnull, "w") as quiet:
        async with Client(stdio_client(params, errlog=quiet)) as client:
            for _ in range(3):  # warm: each side's sandbox booted and reused
                await client.call_tool("run", {"command": ["true"]})
                await arun(["true"], working_dir=work)
            for _ in range(rounds):
                started = time.perf_counter()
                answer = await client.call_tool("run", {"command": ["true"]})
                served = time.perf_counter() - started
                assert not answer.is_error and answer.structured_content["isolated"], answer
                started = time.perf_counter()
                result = await arun(["true"], working_dir=work)
                alone = time.perf_counter() - started
                assert result.isolated, result
                through.append(served)
                direct.append(alone)
                pairs.append(served - alone)
    return {"rounds": rounds, "mcp_run_ms": round(statistics.median(through) * 1000, 1),
            "arun_ms": round(statistics.median(direct) * 1000, 1),
            "overhead_ms": round(statistics.median(pairs) * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="gvm-bench-mcp-")
    try:
        report = asyncio.run(measure(args.rounds, work))
    finally:
        os.rmdir(work)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"`true`, {args.rounds} interleaved rounds: through gvisor-magic mcp (stdio) "
              f"{report['mcp_run_ms']} ms, arun {report['arun_ms']} ms; the server adds "
              f"{report['overhead_ms']} ms (median of paired differences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
