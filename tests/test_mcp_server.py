"""``gvisor-magic mcp`` driven by the official ``mcp`` SDK's own client, over stdio and over
streamable HTTP, as a coding agent drives it: commands run under gVisor and say so, a refused
host shows, paths outside the working dir or through a symlink are refused, a timeout or a
cancelled call ends the command's tree (the host checked afterwards), bad input is a tool
error and the server goes on, and a killed client leaves no sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

ROOT = Path(__file__).resolve().parents[1]


def _params(workdir: Path, *extra: str, env: dict | None = None) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "gvisor_magic.cli", "mcp", "--workdir", str(workdir), *extra],
        env={**os.environ, **(env or {})}, cwd=str(ROOT))


def _call(workdir: Path, calls, *extra: str, env: dict | None = None):
    """Run ``calls(client)`` against a server on ``workdir``; its return value."""

    async def main():
        async with Client(_params(workdir, *extra, env=env)) as client:
            return await calls(client)

    return asyncio.run(main())


def _error(result) -> str:
    assert result.is_error, result
    return result.content[0].text


def test_tools_run_under_gvisor_and_say_so(runsc_works, tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")

    async def calls(client):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        run = await client.call_tool("run", {
            "command": "uname -r; cat notes.txt; curl -s -m 5 http://example.com >/dev/null; "
                       "true"})
        session = [await client.call_tool("session_run", {"session": "build",
                                                          "command": cmd})
                   for cmd in ("echo kept > /tmp/x", "cat /tmp/x")]
        read = await client.call_tool("read_file", {"path": "notes.txt"})
        status = await client.call_tool("status", {})
        return tools, run, session, read, status

    tools, run, session, read, status = _call(tmp_path, calls)
    assert set(tools) == {"run", "session_run", "read_file", "write_file", "changes", "apply",
                          "discard", "status"}
    assert all(tool.input_schema and tool.output_schema for tool in tools.values())
    out = run.structured_content
    assert not run.is_error and out["stdout"] == "4.4.0\nhello\n", out
    assert out["backend"] == "runsc" and out["isolated"] and out["fallback_reason"] is None
    assert any(h.startswith("example.com:80:") for h in out["hosts_refused"]), out
    assert session[1].structured_content["stdout"] == "kept\n"
    assert session[1].structured_content["session"] == "build"
    assert read.structured_content["text"] == "hello\n" and read.structured_content["isolated"]
    assert status.structured_content["gvisor_usable"] is True
    assert status.structured_content["working_dir"] == os.path.realpath(tmp_path)


def test_paths_stay_inside_the_working_dir(runsc_works, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "secret.txt").write_text("host secret\n")
    (work / "out").symlink_to(tmp_path)

    async def calls(client):
        return [await client.call_tool(name, args) for name, args in (
            ("read_file", {"path": "../secret.txt"}),
            ("read_file", {"path": str(tmp_path / "secret.txt")}),
            ("read_file", {"path": "out/secret.txt"}),
            ("write_file", {"path": "out/planted.txt", "content": "x"}),
            ("write_file", {"path": "../planted.txt", "content": "x"}),
            ("run", {"command": "pwd", "cwd": "out"}),
        )]

    answers = _call(work, calls)
    texts = [_error(answer) for answer in answers]
    assert "outside the working dir" in texts[0] and "outside the working dir" in texts[1]
    assert all("symlink" in text for text in (texts[2], texts[3], texts[5])), texts
    assert "outside the working dir" in texts[4]
    assert not (tmp_path / "planted.txt").exists() and "host secret" not in "".join(texts)


def test_a_written_hook_is_held_and_an_inert_file_lands(runsc_works, tmp_path):
    async def calls(client):
        data = await client.call_tool("write_file", {"path": "data/out.csv", "content": "a,b\n"})
        hook = await client.call_tool("write_file", {
            "path": ".git/hooks/pre-commit", "content": "#!/bin/sh\necho owned\n"})
        held = await client.call_tool("changes", {})
        dropped = await client.call_tool("discard", {})
        return data, hook, held, dropped

    data, hook, held, dropped = _call(tmp_path, calls)
    assert data.structured_content["success"] and (tmp_path / "data" / "out.csv").read_text() \
        == "a,b\n"
    assert [c["path"] for c in hook.structured_content["held"]] == [".git/hooks/pre-commit"]
    assert not (tmp_path / ".git" / "hooks" / "pre-commit").exists()
    assert [c["path"] for c in held.structured_content["changes"]] == [".git/hooks/pre-commit"]
    assert "discarded .git/hooks/pre-commit" in dropped.structured_content["lines"]
    assert not (tmp_path / ".git").exists()


def test_bad_input_is_a_tool_error_and_the_server_goes_on(runsc_works, tmp_path):
    async def calls(client):
        answers = [await client.call_tool(name, args) for name, args in (
            ("run", {"command": 5}),
            ("run", {}),
            ("run", {"command": "true", "timeout": -1}),
            ("write_file", {"path": "big", "content": "x" * (8 * 2**20 + 1)}),
            ("changes", {"session": "never-made"}),
            ("no_such_tool", {}),
        )]
        after = await client.call_tool("run", {"command": "echo alive"})
        return answers, after

    answers, after = _call(tmp_path, calls)
    texts = [_error(answer) for answer in answers]
    assert "valid string" in texts[0] or "validation" in texts[0], texts[0]
    assert "command" in texts[1] and "Traceback" not in "".join(texts)
    assert "positive" in texts[2]
    assert "larger than" in texts[3] and not (tmp_path / "big").exists()
    assert "no session named 'never-made'" in texts[4]
    assert "no_such_tool" in texts[5]
    assert after.structured_content["stdout"] == "alive\n"


SLOW_CHILD = "(sleep 8; touch {name}) & echo started > {name}.started; sleep 100"


def test_a_timeout_ends_the_commands_tree_and_the_server_limit_holds(runsc_works, tmp_path):
    """The command starts a child that would write a file 8 s later (writes land as made
    here); it asks for 60 s, the server allows 5: the timeout ends the tree first."""

    async def calls(client):
        timed = await client.call_tool("run", {"command": SLOW_CHILD.format(name="late"),
                                               "timeout": 60})
        await asyncio.sleep(5)  # past the moment the child would have written
        return timed

    timed = _call(tmp_path, calls, "--timeout", "5", "--writes", "direct")
    out = timed.structured_content
    assert out["timed_out"] and not out["success"], out
    assert any("at most 5 s" in w for w in out["warnings"]), out["warnings"]
    assert (tmp_path / "late.started").exists() and not (tmp_path / "late").exists()


def test_a_cancelled_call_ends_the_commands_tree(runsc_works, tmp_path):
    """Cancelled by the client, the session's command (with 60 s to run) is killed with its
    child, which would have written a file 8 s after it started; the session goes on."""

    async def calls(client):
        task = asyncio.create_task(client.call_tool(
            "session_run", {"session": "s", "command": SLOW_CHILD.format(name="late")}))
        deadline = time.monotonic() + 60
        while not (tmp_path / "late.started").exists():
            assert time.monotonic() < deadline, "the session's command never started"
            await asyncio.sleep(0.05)
        cancelled_at = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        after = await client.call_tool("session_run", {"session": "s",
                                                       "command": "ps -e -o comm="})
        waited = time.monotonic() - cancelled_at
        await asyncio.sleep(max(0.0, cancelled_at + 9 - time.monotonic()))
        return after, waited

    after, waited = _call(tmp_path, calls, "--timeout", "60", "--writes", "direct")
    assert "sleep" not in after.structured_content["stdout"].split()
    assert waited < 30, "the next command waited for the cancelled one to run out"
    assert not (tmp_path / "late").exists(), "the cancelled command's child ran on"


def _server_sandboxes(state: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(state) in " ".join(process.info["cmdline"] or []):
                found.append(process)
    return found


def test_a_killed_client_leaves_no_sandbox(runsc_works, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "work").mkdir()
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import asyncio, os, sys
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters
        async def main():
            params = StdioServerParameters(
                command=sys.executable, cwd={str(ROOT)!r},
                args=["-m", "gvisor_magic.cli", "mcp", "--workdir", {str(tmp_path / "work")!r}],
                env={{**os.environ, "GVISOR_MAGIC_STATE_DIR": {str(state)!r}}})
            async with Client(params) as client:
                await client.call_tool("session_run", {{"session": "a", "command": "true"}})
                print("RUNNING", flush=True)
                await client.call_tool("session_run", {{"session": "a",
                                                        "command": "sleep 1000"}})
        asyncio.run(main())
        """)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert client.stdout.readline() == b"RUNNING\n"
        time.sleep(1)
        assert _server_sandboxes(state), "no sandbox ran"
        client.send_signal(signal.SIGKILL)  # the agent dies; its server is left alone
        client.wait(timeout=10)
        deadline = time.monotonic() + 60
        while _server_sandboxes(state) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _server_sandboxes(state), "the server's sandbox outlived its client"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        client.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_over_http_only_with_the_token(runsc_works, tmp_path):
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gvisor_magic.cli", "mcp", "--workdir", str(tmp_path),
         "--http", str(port), "--token-file", str(token_file)], cwd=ROOT,
        stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)

        async def main():
            async with httpx2.AsyncClient() as anonymous:
                refused = await anonymous.post(url, json={"jsonrpc": "2.0", "id": 1,
                                                          "method": "tools/list"})
            headers = {"Authorization": "Bearer s3cret-token"}
            async with httpx2.AsyncClient(headers=headers, timeout=120) as http, \
                    Client(streamable_http_client(url, http_client=http)) as client:
                ran = await client.call_tool("run", {"command": "uname -r"})
            return refused, ran

        refused, ran = asyncio.run(main())
        assert refused.status_code == 401
        assert ran.structured_content["stdout"] == "4.4.0\n" and ran.structured_content[
            "isolated"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_fail_closed_refuses_where_gvisor_cannot_run(tmp_path):
    async def calls(client):
        return await client.call_tool("run", {"command": "echo ran > ran"})

    answer = _call(tmp_path, calls, "--mode", "runsc", "--require-isolation",
                   env={"GVISOR_MAGIC_RUNSC": str(tmp_path / "no-runsc-here")})
    text = _error(answer)
    assert "runsc" in text and not (tmp_path / "ran").exists(), text


def test_settings_from_a_config_file_and_the_command_line(runsc_works, tmp_path):
    (tmp_path / "config.json").write_text(
        '{"timeout": 7, "writes": "direct", "limits": {"memory": "1G"}}')

    async def calls(client):
        return await client.call_tool("status", {})

    status = _call(tmp_path, calls, "--config", str(tmp_path / "config.json"),
                   "--timeout", "9").structured_content
    assert status["max_timeout_s"] == 9.0 and status["writes"] == "direct", status
    assert "memory 1 GiB" in status["limits"], status


def test_bad_settings_stop_the_server_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"network": "pypi", "colour": "red"}')
    done = subprocess.run([sys.executable, "-m", "gvisor_magic.cli", "mcp", "--config",
                           str(tmp_path / "config.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "unknown setting(s) colour" in done.stderr, done.stderr


@pytest.fixture(autouse=True)
def _no_pool_left():
    yield
    from gvisor_magic.warm import POOL

    POOL.reset()
