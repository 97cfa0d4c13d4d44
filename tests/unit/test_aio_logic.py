"""The asyncio faces' own logic, with stand-in calls instead of sandboxes (the real thing:
tests/test_aio.py): an interrupt asked from another thread arrives once, at a checkpoint;
cancelling a task interrupts its call and waits for it; a slow consumer holds the call
back; errors and results come through unchanged."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gvisor_magic import aio
from gvisor_magic.errors import CommandCancelled, CommandInterrupted
from gvisor_magic.interrupts import Interrupt, checkpoint, interruptible
from gvisor_magic.result import CommandResult


def _result(stdout: str = "", returncode: int = 0) -> CommandResult:
    return CommandResult(returncode, stdout, "", "runsc", True)


def test_an_interrupt_is_raised_once_and_only_in_its_thread():
    interrupt = Interrupt()
    checkpoint()  # nothing installed: nothing happens
    with interruptible(interrupt):
        checkpoint()
        interrupt.set()
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(checkpoint()))
        thread.start()
        thread.join()
        assert elsewhere == [None]
        with pytest.raises(KeyboardInterrupt):
            checkpoint()
        checkpoint()  # delivered once, as one Ctrl-C
    checkpoint()


def _interruptible_work(emit, ran: list) -> CommandResult:
    """Stands for the core: output, then waiting at checkpoints until interrupted."""
    emit("stdout", "start\n")
    try:
        while True:
            checkpoint()
            time.sleep(0.01)
    except KeyboardInterrupt:
        ran.append("killed")
        raise CommandInterrupted(_result("start\n", -9)) from None


def test_cancelling_the_task_interrupts_the_call_and_waits_for_it():
    ran: list = []

    async def main():
        seen = asyncio.Event()
        task = asyncio.create_task(aio._run(lambda emit: _interruptible_work(emit, ran),
                                            lambda stream, text: seen.set()))
        await seen.wait()
        task.cancel()
        with pytest.raises(CommandCancelled) as caught:
            await task
        assert ran == ["killed"], "the await ended before the call was interrupted"
        return caught.value

    cancelled = asyncio.run(main())
    assert isinstance(cancelled, asyncio.CancelledError)
    assert cancelled.result.stdout == "start\n" and cancelled.result.returncode == -9


def test_results_and_errors_come_through_unchanged():
    async def main():
        ok = await aio._run(lambda emit: _result("fine"), None)
        with pytest.raises(ValueError, match="bad"):
            await aio._run(lambda emit: (_ for _ in ()).throw(ValueError("bad")), None)
        return ok

    assert asyncio.run(main()).stdout == "fine"


def test_a_slow_consumer_holds_the_call_back(monkeypatch):
    monkeypatch.setattr(aio, "PENDING_CHUNKS", 4)
    emitted = []

    def work(emit):
        for number in range(40):
            emit("stdout", f"{number}\n")
            emitted.append(number)
        return _result("".join(f"{n}\n" for n in range(40)))

    async def main():
        stream = aio.CommandStream(work)
        ahead = []
        chunks = []
        async for chunk in stream:
            chunks.append(chunk.text)
            await asyncio.sleep(0.01)  # a slow consumer
            ahead.append(len(emitted) - len(chunks))
        return chunks, ahead, stream.result

    chunks, ahead, result = asyncio.run(main())
    assert chunks == [f"{n}\n" for n in range(40)] and result.stdout.count("\n") == 40
    assert max(ahead) <= 4 + 1, f"the call ran ahead of its consumer by {max(ahead)} chunks"


def test_closing_a_stream_early_interrupts_its_call():
    ran: list = []

    async def main():
        stream = aio.CommandStream(lambda emit: _interruptible_work(emit, ran))
        async with stream:
            async for chunk in stream:
                assert chunk == aio.OutputChunk("stdout", "start\n")
                break
        return stream.result

    result = asyncio.run(main())
    assert ran == ["killed"] and result.returncode == -9


def test_a_consumer_that_never_reads_does_not_hold_the_call_past_its_timeout(monkeypatch):
    """Held back, the call's output stops waiting for room once its timeout is due, so the
    core reaches its own deadline check (a real command is then killed as timed out)."""
    monkeypatch.setattr(aio, "PENDING_CHUNKS", 2)
    emitted = []

    def work(emit):
        for number in range(50):
            emit("stdout", f"{number}\n")
            emitted.append(number)
        return _result()

    async def main():
        stream = aio.CommandStream(work, timeout=0.3)
        async with stream:
            await asyncio.sleep(1.5)  # reads nothing meanwhile
            held = len(emitted)
            chunks = [chunk async for chunk in stream]
        return held, chunks

    held, chunks = asyncio.run(main())
    assert held == 50, f"the call was still held back past its timeout ({held} chunks out)"
    assert len(chunks) == 50, "chunks sent past the deadline were lost"


def test_a_stream_dropped_unfinished_interrupts_its_call():
    import gc

    ran: list = []

    async def main():
        stream = aio.CommandStream(lambda emit: _interruptible_work(emit, ran))
        async for _ in stream:
            break
        del stream
        gc.collect()
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert ran == ["killed"]
