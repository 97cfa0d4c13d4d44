"""The host's side of the agent channel, with a fake transport: what arrives from inside a
sandbox is untrusted, so garbage, oversized frames and silence end in ``SessionBroken`` or
a bounded wait, never a hang. (Commands cannot write into the real channel: see
tests/security/test_agent_sealed.py.)"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from gvisor_magic.agent_channel import MAX_FRAME, Channel, SessionBroken


class FakeTransport:
    """One end of a socket pair stands for the sandbox; the test writes the agent's side."""

    def __init__(self) -> None:
        self.host, self.agent = socket.socketpair()
        self.stdout_fd = self.host.fileno()
        self.sent = bytearray()

    def send(self, data: bytes) -> None:
        self.sent += data

    def stderr_text(self) -> str:
        return "runsc: boom"

    def close(self) -> None:
        self.host.close()
        self.agent.close()


@pytest.fixture
def fake():
    transport = FakeTransport()
    yield transport
    transport.close()


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def test_frames_split_anywhere_are_put_together(fake):
    channel = Channel(fake)
    data = frame(b"O", b"hello") + frame(b"X", b'{"exit": 3}')
    for byte in data[:7]:
        fake.agent.send(bytes([byte]))
    fake.agent.send(data[7:])
    assert channel.receive(time.monotonic() + 5) == (b"O", b"hello")
    assert channel.receive(time.monotonic() + 5) == (b"X", b'{"exit": 3}')


def test_garbage_and_oversized_frames_break_the_session(fake):
    fake.agent.send(b"Z\xff\xff\xff\xffjunk")
    with pytest.raises(SessionBroken, match="malformed frame"):
        Channel(fake).receive(time.monotonic() + 5)
    other = FakeTransport()
    try:
        other.agent.send(b"O" + struct.pack(">I", MAX_FRAME + 1))
        with pytest.raises(SessionBroken, match="malformed frame"):
            Channel(other).receive(time.monotonic() + 5)
    finally:
        other.close()


def test_silence_is_a_bounded_wait_and_a_closed_channel_says_why(fake):
    channel = Channel(fake)
    start = time.monotonic()
    assert channel.receive(start + 0.3) is None
    assert time.monotonic() - start < 5
    fake.agent.shutdown(socket.SHUT_WR)
    with pytest.raises(SessionBroken, match=r"closed its channel.*runsc: boom"):
        channel.receive(time.monotonic() + 5)


def test_sends_are_framed(fake):
    Channel(fake).send(b"R", b"{}")
    assert bytes(fake.sent) == b"R\x00\x00\x00\x02{}"
    assert os.get_blocking(fake.stdout_fd)


def test_a_reset_channel_is_a_broken_session(fake):
    """A peer killed with our frame unread resets the socket rather than closing it: the
    session is broken, as on a close (a warm sandbox killed before it accepted a command;
    tests/test_reuse.py), never an OSError out of the runner."""
    fake.host.send(b"R\x00\x00\x00\x00")  # the run request the dead agent never read
    fake.agent.close()
    with pytest.raises(SessionBroken, match=r"channel broke: .*reset.*runsc: boom"):
        Channel(fake).receive(time.monotonic() + 5)


def test_a_copy_out_answer_goes_to_the_thread_that_asked_whenever_it_comes(fake):
    """A gVisor kernel's cell end: the answer to ``C`` arrives among the command's output,
    read by the thread following the command; ``copy_out`` (another thread) gets it."""
    import threading

    from gvisor_magic.agent_channel import AgentClient
    from gvisor_magic.process import Capture

    client = AgentClient(fake)
    assert client.copy_out(1.0) == {"layer": "no command runs"}
    fake.agent.send(frame(b"A"))
    out, err = Capture("stdout", None), Capture("stderr", None)
    runs = []
    follower = threading.Thread(target=lambda: runs.append(
        client.run({"argv": ["k"]}, out, err, None, time.monotonic() + 30)))
    follower.start()
    deadline = time.monotonic() + 10
    while not client.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    fake.agent.send(frame(b"O", b"before ") + frame(b"L", b'{"layer": "done", "layer_id": 3}'))
    assert client.copy_out(10.0) == {"layer": "done", "layer_id": 3}
    assert bytes(fake.sent).endswith(frame(b"C"))
    fake.agent.send(frame(b"L", b"[]") + frame(b"O", b"after") + frame(b"X", b'{"exit": 0}'))
    follower.join(10)
    assert runs and runs[0].status == {"exit": 0} and not client.running
    assert out.text() == "before after"
    # A stale answer (to an ask that gave up) is not taken for the next one's.
    assert client.copy_out(0.2) == {"layer": "no command runs"}


def _run_with(fake, on_output):
    from gvisor_magic.agent_channel import AgentClient
    from gvisor_magic.process import Capture

    # The agent accepts, prints, and confirms the kill it will be sent.
    fake.agent.send(frame(b"A") + frame(b"O", b"start\n")
                    + frame(b"X", b'{"signal": 9, "killed": true}'))
    out, err = Capture("stdout", None), Capture("stderr", None)
    run = AgentClient(fake).run({"argv": ["sleep"]}, out, err, on_output,
                                time.monotonic() + 30)
    return run, out


def test_an_interrupt_inside_the_output_callback_kills_the_command(fake):
    """Ctrl-C while the output is being shown (a kernel's flush waits for its IO thread,
    and the client that saw "start" interrupts meanwhile) is an interrupt like any other:
    the command is killed, never left running with the error gone up."""

    def on_output(name: str, text: str) -> None:
        raise KeyboardInterrupt

    run, out = _run_with(fake, on_output)
    assert run.interrupted and run.failure is None and not run.lost
    assert run.status == {"signal": 9, "killed": True}
    assert bytes(fake.sent).endswith(frame(b"K"))
    assert out.text() == "start\n"


def test_a_failing_output_callback_kills_the_command_and_is_kept(fake):
    def on_output(name: str, text: str) -> None:
        raise BrokenPipeError("stdout is gone")

    run, _ = _run_with(fake, on_output)
    assert isinstance(run.failure, BrokenPipeError) and not run.interrupted
    assert bytes(fake.sent).endswith(frame(b"K"))
