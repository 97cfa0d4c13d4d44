"""The asyncio API on real gVisor sandboxes: the same results as the blocking API, output as
it comes and on the loop's thread, a cancelled task that kills the command's whole tree (the
host checked afterwards), and many commands at once without blocking the loop."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time

import pytest
from support.leaks import sandbox_processes

from gvisor_magic import (
    AsyncIsolatedSession,
    CommandCancelled,
    InvalidRequestError,
    OutputChunk,
    arun,
    astream,
)
from gvisor_magic.warm import POOL

SANDBOX_RELEASE = "4.4.0"


@pytest.fixture(autouse=True)
def no_pooled_sandboxes():
    yield
    POOL.reset()  # one-shot calls keep a warm sandbox for the next: not past this test


async def _wait_for(path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)


def test_arun_is_run_command_isolated_with_output_on_the_loop(runsc_works, tmp_path):
    async def main():
        loop_thread = threading.get_ident()
        seen = []

        def on_output(stream: str, text: str) -> None:
            seen.append((stream, text, threading.get_ident() == loop_thread))

        result = await arun("uname -r; echo oops >&2; exit 3", working_dir=tmp_path,
                            mode="runsc", on_output=on_output)
        return result, seen

    result, seen = asyncio.run(main())
    assert (result.stdout, result.stderr, result.returncode) == (
        f"{SANDBOX_RELEASE}\n", "oops\n", 3)
    assert result.backend == "runsc" and result.isolated and result.fallback_reason is None
    assert [(s, t) for s, t, _ in seen] == [("stdout", f"{SANDBOX_RELEASE}\n"),
                                           ("stderr", "oops\n")]
    assert all(on_loop for _, _, on_loop in seen), "on_output ran off the loop's thread"


def test_bad_input_is_raised_by_the_await(tmp_path):
    async def main():
        await arun("true", working_dir=tmp_path, timeout=-1)

    with pytest.raises(InvalidRequestError, match="timeout"):
        asyncio.run(main())


@pytest.mark.parametrize("how", ["one-shot", "session"])
def test_cancelling_the_task_kills_the_whole_tree(runsc_works, tmp_path, how):
    """The command starts a child that would write a file on the host 3 s later: after the
    cancel, it never does, the partial output is kept, and (in a session) the sandbox is
    kept with nothing of the command left in it."""
    script = "(sleep 3; touch late) & echo started > started; echo start; sleep 100"

    async def main():
        session = None
        printed = asyncio.Event()

        def on_output(stream: str, text: str) -> None:
            if "start" in text:
                printed.set()

        if how == "session":
            session = AsyncIsolatedSession(working_dir=tmp_path, mode="runsc", writes="direct")
            await session.start()
            task = asyncio.create_task(session.run(script, on_output=on_output))
        else:
            task = asyncio.create_task(arun(script, working_dir=tmp_path, mode="runsc",
                                            writes="direct", reuse=False,
                                            on_output=on_output))
        await _wait_for(tmp_path / "started")
        await asyncio.wait_for(printed.wait(), 60)
        task.cancel()
        with pytest.raises(CommandCancelled) as caught:
            await task
        assert task.cancelled()
        after = None
        if session is not None:
            after = await session.run("ps -e -o comm=")
            await session.aclose()
        await asyncio.sleep(4)  # past the moment the child would have written
        return caught.value, after

    cancelled, after = asyncio.run(main())
    assert cancelled.result is not None and cancelled.result.stdout == "start\n"
    assert not (tmp_path / "late").exists(), "the command's child outlived the cancel"
    if after is not None:
        assert after.success and "sleep" not in after.stdout.split(), after.stdout
    assert not sandbox_processes_now()


def sandbox_processes_now() -> list:
    """This test session's sandbox processes (conftest points TMPDIR at the session's own
    temporary dir, where every sandbox's state lives)."""
    return sandbox_processes(os.environ["TMPDIR"])


def test_cancelling_while_the_sandbox_starts_leaves_nothing(runsc_works, tmp_path):
    async def main():
        session = AsyncIsolatedSession(working_dir=tmp_path, mode="runsc")
        task = asyncio.create_task(session.run("echo never"))
        await asyncio.sleep(0.2)  # its sandbox is starting
        task.cancel()
        with pytest.raises(CommandCancelled):
            await task
        await session.aclose()

    asyncio.run(main())
    assert not sandbox_processes_now()


def test_a_stream_gives_chunks_as_they_come_and_closing_it_interrupts(runsc_works,
                                                                       tmp_path):
    async def main():
        stamps = []
        async with AsyncIsolatedSession(working_dir=tmp_path, mode="runsc") as session:
            async with session.stream("for i in 1 2 3; do echo $i; sleep 0.5; done") as lines:
                async for chunk in lines:
                    stamps.append((chunk, time.monotonic()))
            finished = lines.result
            # A consumer that stops early: the command (endless) is interrupted, and its
            # output waits for the consumer rather than filling memory.
            endless = session.stream("yes")
            taken = []
            async for chunk in endless:
                taken.append(chunk)
                if len(taken) == 3:
                    break
            await endless.aclose()
            after = await session.run("ps -e -o comm=")
        return stamps, finished, endless.result, after

    stamps, finished, endless, after = asyncio.run(main())
    assert [chunk for chunk, _ in stamps] == [OutputChunk("stdout", f"{i}\n") for i in (1, 2, 3)]
    assert stamps[-1][1] - stamps[0][1] > 0.5, "the chunks came together, not as printed"
    assert finished.returncode == 0 and finished.stdout == "1\n2\n3\n"
    assert endless is not None and not endless.success
    assert "yes" not in after.stdout.split(), after.stdout


def test_a_one_shot_stream(runsc_works, tmp_path):
    async def main():
        stream = astream(["sh", "-c", "echo a; sleep 0.3; echo b >&2"], working_dir=tmp_path,
                         mode="runsc")
        return [chunk async for chunk in stream], stream.result

    chunks, result = asyncio.run(main())
    assert chunks == [OutputChunk("stdout", "a\n"), OutputChunk("stderr", "b\n")]
    assert result.backend == "runsc" and result.isolated and result.returncode == 0


def test_eight_sessions_at_once_and_the_loop_keeps_ticking(runsc_works, tmp_path):
    """Eight warm sessions start and run a 2 s command at the same time from one loop: the
    commands overlap (each records when it ran, inside its sandbox), and a timer task keeps
    ticking every 50 ms meanwhile (a blocked loop would stall it for seconds)."""

    async def main():
        ticks = []
        stop = asyncio.Event()

        async def ticker():
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        timer = asyncio.create_task(ticker())
        dirs = [tmp_path / f"s{i}" for i in range(8)]
        for one in dirs:
            one.mkdir()
        sessions = [AsyncIsolatedSession(working_dir=one, mode="runsc") for one in dirs]
        try:
            await asyncio.gather(*(s.start() for s in sessions))
            results = await asyncio.gather(*(
                s.run("date +%s.%N; sleep 2; date +%s.%N") for s in sessions))
        finally:
            await asyncio.gather(*(s.aclose() for s in sessions))
            stop.set()
            await timer
        return results, ticks

    results, ticks = asyncio.run(main())
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    assert all(r.backend == "runsc" and r.isolated for r in results)
    assert max(start for start, _ in spans) < min(end for _, end in spans), (
        f"the commands did not run at the same time: {spans}")
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 20 and max(gaps) < 1.0, f"the loop stalled: {max(gaps):.2f} s"
