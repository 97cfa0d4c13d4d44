"""The runner for asyncio: ``arun``, ``astream`` and ``AsyncIsolatedSession``.

These are faces over the blocking core, not a copy of it: each call runs
``run_command_isolated`` or ``IsolatedSession.run`` on a thread of its own (never the
loop's default executor, whose few workers would make the ninth concurrent command wait),
and hands its output to the event loop as it comes. So every result is the same
``CommandResult`` with the same honesty (``backend``, ``isolated``, ``fallback_reason``),
and nothing a command does blocks the loop.

Cancelling the task that awaits a call is an interrupt, delivered to the call's thread as
Ctrl-C is to a notebook's (``interrupts.py``): the command's whole tree is killed, its
sandbox kept or removed as after Ctrl-C, and the await raises ``CommandCancelled`` (an
``asyncio.CancelledError``) carrying the partial result. The task stays cancelled until the
kill has finished, so nothing of the command outlives the await.

Output arrives in order, as ``OutputChunk(stream, text)``: to ``on_output`` (called on the
loop's thread) or by ``async for`` over ``astream`` / ``AsyncIsolatedSession.stream``. A
consumer slower than the command holds it back (at most ``PENDING_CHUNKS`` chunks wait;
then the command's pipe fills and it waits too) rather than filling memory, but never past
the command's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .errors import CommandCancelled, CommandInterrupted
from .interrupts import Interrupt, checkpoint, interruptible
from .request import DEFAULT_TIMEOUT
from .result import CommandResult

__all__ = ["AsyncIsolatedSession", "CommandStream", "OutputChunk", "arun", "astream"]

#: Output chunks that may wait for a slow consumer before the command is held back.
PENDING_CHUNKS = 256


class OutputChunk(NamedTuple):
    """Some output of a command: ``stream`` is "stdout" or "stderr"."""

    stream: str
    text: str


#: What a call's thread runs: the blocking call, given the output callback to use.
Work = Callable[[Callable[[str, str], None]], CommandResult]


class _Call:
    """One blocking call on a thread of its own; its output and end handed to the loop."""

    def __init__(self, work: Work, deliver: Callable[[OutputChunk], None],
                 timeout: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._work, self._deliver = work, deliver
        #: Past it, the command's own timeout is due: its output stops waiting for room, so
        #: the core reaches its deadline check and kills it (a slow consumer never makes a
        #: command run past its timeout).
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.interrupt = Interrupt()
        #: (result, exception): set on the loop's thread when the call's thread ends.
        self.done: asyncio.Future[tuple[CommandResult | None, BaseException | None]] = \
            self._loop.create_future()
        self._room = threading.Semaphore(PENDING_CHUNKS)
        self._unheard = False  # nobody takes its output any more: do not wait for room
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name="gvisor-magic-aio")
        self._thread.start()

    def _main(self) -> None:
        outcome: tuple[CommandResult | None, BaseException | None]
        with interruptible(self.interrupt):
            try:
                outcome = (self._work(self._emit), None)
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self._loop.call_soon_threadsafe(self._end, outcome)

    def _end(self, outcome: tuple[CommandResult | None, BaseException | None]) -> None:
        if not self.done.done():
            self.done.set_result(outcome)

    def _emit(self, name: str, text: str) -> None:
        """The core's output callback, on the call's thread."""
        while not self._unheard:
            if self._deadline is not None and time.monotonic() > self._deadline:
                self._room.acquire(blocking=False)  # its timeout is due: no waiting
                break
            if self._room.acquire(timeout=0.1):
                break
            checkpoint()  # held back by a slow consumer: still interruptible
        if self._unheard:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, OutputChunk(name, text))
        except RuntimeError:
            self._unheard = True

    def taken(self) -> None:
        """One chunk was taken by the consumer: room for another (a chunk sent past the
        deadline took none; releasing more than was taken only makes room for later)."""
        self._room.release()

    def unheard(self) -> None:
        """Nobody takes the output any more (the stream was closed)."""
        self._unheard = True
        self._room.release()

    async def outcome(self) -> Any:
        """What the call returned (or raised); cancelling the awaiting task interrupts the
        command and raises ``CommandCancelled`` once it was killed."""
        try:
            result, exc = await asyncio.shield(self.done)
        except asyncio.CancelledError:
            raise CommandCancelled(await self.interrupted()) from None
        if exc is not None:
            raise exc
        return result

    async def interrupted(self) -> CommandResult | None:
        """Interrupt the command unless it has ended, and wait until its thread is done
        (bounded by the core's own kill grace), whatever else is cancelled meanwhile; the
        (partial) result, if there is one."""
        if not self.done.done():
            self.interrupt.set()
        while True:
            try:
                result, exc = await asyncio.shield(self.done)
                break
            except asyncio.CancelledError:
                continue
        return exc.result if isinstance(exc, CommandInterrupted) else result


async def _run(work: Callable[[Callable[[str, str], None]], Any],
               on_output: Callable[[str, str], Any] | None,
               timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    holder: list[_Call] = []

    def deliver(chunk: OutputChunk) -> None:
        try:
            if on_output is not None:
                on_output(chunk.stream, chunk.text)
        finally:
            holder[0].taken()

    call = _Call(work, deliver, timeout)
    holder.append(call)
    return await call.outcome()


class CommandStream:
    """One command's output as it comes: ``async for chunk in stream`` gives
    ``OutputChunk``s; once they end, ``stream.result`` is the ``CommandResult``.

    ``await stream.wait()`` skips to the result. Leaving ``async with stream`` (or
    ``await stream.aclose()``) before the command ended interrupts it. An error of the
    call (``IsolationUnavailable``, say) is raised by the iteration or ``wait``."""

    def __init__(self, work: Work, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._work, self._timeout = work, timeout
        self._call: _Call | None = None
        self._queue: asyncio.Queue[OutputChunk | None] = asyncio.Queue()
        self._ended = False
        #: The command's result, once its output has ended.
        self.result: CommandResult | None = None

    def _started(self) -> _Call:
        if self._call is None:
            queue = self._queue  # not self: a stream dropped unfinished is interrupted
            self._call = _Call(self._work, queue.put_nowait, self._timeout)
            self._call.done.add_done_callback(lambda _: queue.put_nowait(None))
        return self._call

    def __del__(self) -> None:
        # Dropped before its output ended (a ``break`` without ``aclose``): nobody will
        # take the rest, so the command is interrupted rather than left waiting for room.
        call = getattr(self, "_call", None)
        if call is not None and not self._ended and not call.done.done():
            call.unheard()
            call.interrupt.set()

    def __aiter__(self) -> CommandStream:
        self._started()
        return self

    async def __anext__(self) -> OutputChunk:
        call = self._started()
        if self._ended:
            raise StopAsyncIteration
        try:
            chunk = await self._queue.get()
        except asyncio.CancelledError:
            self._ended = True
            call.unheard()
            self.result = await call.interrupted()
            raise CommandCancelled(self.result) from None
        if chunk is not None:
            call.taken()
            return chunk
        self._ended = True
        self.result = await call.outcome()
        raise StopAsyncIteration

    async def wait(self) -> CommandResult:
        """Let the rest of the output go by; the result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        """Interrupt the command if it still runs, and wait until it was killed."""
        call = self._call
        if call is None or self._ended:
            return
        self._ended = True
        call.unheard()
        self.result = await call.interrupted()

    async def __aenter__(self) -> CommandStream:
        self._started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def arun(command: str | Sequence[str], spec: Any = None, repo_path: Any = None, *,
               on_output: Callable[[str, str], Any] | None = None,
               **options: Any) -> CommandResult:
    """``run_command_isolated`` for asyncio: the same arguments, the same result.

    ``on_output(stream, text)`` is called on the loop's thread as output comes. Cancelling
    the awaiting task interrupts the command (``CommandCancelled``, see the top)."""
    from .runner import run_command_isolated

    return await _run(lambda emit: run_command_isolated(
        command, spec, repo_path, on_output=emit, **options), on_output,
        options.get("timeout", DEFAULT_TIMEOUT))


def astream(command: str | Sequence[str], spec: Any = None, repo_path: Any = None,
            **options: Any) -> CommandStream:
    """``run_command_isolated`` for ``async for``: its output as it comes, then
    ``stream.result``. Call it from a coroutine; the command starts at the first
    ``async for`` step (or ``async with``)."""
    from .runner import run_command_isolated

    return CommandStream(lambda emit: run_command_isolated(
        command, spec, repo_path, on_output=emit, **options),
        options.get("timeout", DEFAULT_TIMEOUT))


class AsyncIsolatedSession:
    """``IsolatedSession`` for asyncio: one warm sandbox, its commands awaited.

    ``async with AsyncIsolatedSession(...) as session`` starts the sandbox (off the loop)
    and closes it at the end. The arguments are ``IsolatedSession``'s; ``session.blocking``
    is that session (its ``changes``, ``apply``, ``discard``, ``spec``). Commands sent at
    once run one after another in the sandbox, as in the blocking session."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from .session import IsolatedSession

        #: The blocking session every call goes through.
        self.blocking = IsolatedSession(*args, **kwargs)

    async def start(self) -> None:
        """Start the sandbox now (off the loop) rather than at the first command."""
        await _run(lambda emit: _started(self.blocking), None, None)

    async def run(self, command: str | Sequence[str], *,
                  on_output: Callable[[str, str], Any] | None = None,
                  **options: Any) -> CommandResult:
        """``IsolatedSession.run``: the same arguments and result; cancelling the awaiting
        task interrupts the command, and the sandbox is kept (as after Ctrl-C)."""
        return await _run(lambda emit: self.blocking.run(command, on_output=emit, **options),
                          on_output, options.get("timeout", DEFAULT_TIMEOUT))

    def stream(self, command: str | Sequence[str], **options: Any) -> CommandStream:
        """``run``, for ``async for``: its output as it comes, then ``stream.result``."""
        return CommandStream(lambda emit: self.blocking.run(command, on_output=emit,
                                                            **options),
                             options.get("timeout", DEFAULT_TIMEOUT))

    async def aclose(self) -> None:
        """Stop the sandbox (off the loop); idempotent."""
        await _run(lambda emit: _closed(self.blocking), None, None)

    async def __aenter__(self) -> AsyncIsolatedSession:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def backend(self) -> str | None:
        return self.blocking.backend

    @property
    def state(self) -> str:
        return self.blocking.state


def _started(session: Any) -> Any:
    session.start()
    return None


def _closed(session: Any) -> Any:
    session.close()
    return None

