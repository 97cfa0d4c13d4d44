"""Fallback, never-twice and hostile frames, with fake backends and a scripted agent: the
runner's and the session's rules in seconds, with no runsc, Docker or Linux needed."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from gvisor_magic import IsolatedSession, IsolationUnavailable, registry, run_command_isolated
from gvisor_magic import runner as runner_module
from gvisor_magic.detect import BackendStatus
from gvisor_magic.egress import NetworkPolicy
from gvisor_magic.egress.sandbox import SandboxNetwork
from gvisor_magic.errors import SandboxStartError
from gvisor_magic.result import RUNTIME_FAILURE, CommandResult


class FakeBackend:
    """Probes as told; ``run`` raises a start failure as told, else 'runs' once."""

    def __init__(self, name: str, *, works: bool = True, starts: bool = True) -> None:
        self.name, self.isolated = name, name != "subprocess"
        self.works, self.starts, self.ran, self.probes = works, starts, 0, 0

    def probe(self) -> BackendStatus:
        self.probes += 1
        return BackendStatus(self.name, self.works, self.isolated,
                             "probe ran" if self.works else f"{self.name} is broken here")

    def run(self, request, on_output=None) -> CommandResult:
        if not (self.works and self.starts):
            raise SandboxStartError(self.name, "this sandbox failed to start")
        self.ran += 1
        return CommandResult(0, f"ran on {self.name}\n", "", self.name, self.isolated)


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    made: dict[str, FakeBackend] = {}

    def install(**specs: dict) -> dict[str, FakeBackend]:
        for name in registry.NAMES:
            made[name] = FakeBackend(name, **specs.get(name, {}))
        monkeypatch.setattr(registry, "backend_class",
                            lambda name: (lambda: made[name]))
        monkeypatch.setattr(runner_module, "preferred_backends",
                            lambda facts: (["runsc", "docker", "subprocess"], "test order"))
        runner_module.REGISTRY.forget()
        return made

    monkeypatch.chdir(tmp_path)
    yield install
    runner_module.REGISTRY.forget()


def test_auto_skips_a_backend_a_probe_found_broken_and_says_why(fakes, tmp_path):
    made = fakes(runsc={"works": False})
    assert not runner_module.REGISTRY.status("runsc").available  # e.g. `doctor` ran
    result = run_command_isolated("true", working_dir=tmp_path)
    assert result.backend == "docker" and result.stdout == "ran on docker\n"
    assert "runsc is broken here" in result.fallback_reason
    assert [made[n].ran for n in registry.NAMES] == [0, 1, 0]


def test_one_sandbox_failing_to_start_is_the_commands_error_not_a_fallback(fakes, tmp_path):
    made = fakes(runsc={"starts": False})
    result = run_command_isolated("true", working_dir=tmp_path)
    assert result.backend == "runsc" and result.returncode == RUNTIME_FAILURE
    assert "did not run" in result.error and result.details["not_started"]
    assert made["runsc"].probes == 1  # the re-probe proved runsc works here
    assert [made[n].ran for n in registry.NAMES] == [0, 0, 0]


def test_a_start_failure_where_gvisor_does_not_work_moves_on_and_runs_once(fakes, tmp_path):
    made = fakes(runsc={"works": False})
    result = run_command_isolated("true", working_dir=tmp_path)
    assert result.backend == "docker" and "runsc" in result.fallback_reason
    assert made["runsc"].probes == 1  # the re-probe said gVisor does not work here
    assert [made[n].ran for n in registry.NAMES] == [0, 1, 0]


def test_required_isolation_never_reaches_the_host(fakes, tmp_path):
    made = fakes(runsc={"works": False}, docker={"works": False})
    with pytest.raises(IsolationUnavailable) as raised:
        run_command_isolated("true", working_dir=tmp_path, require_isolation=True)
    assert set(raised.value.reasons) == {"runsc", "docker"}
    assert made["subprocess"].ran == 0


# -- a scripted agent behind a fake transport ------------------------------------------------

def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


class ScriptedTransport:
    """Plays the agent: says hello, then answers each request with ``script(request)``,
    and after its report, with ``settled(request)`` (the agent's word on its clean-up)."""

    name = "runsc"
    script = staticmethod(lambda spec: [frame(b"A"), frame(b"X", b'{"exit": 0}')])
    settled = staticmethod(lambda spec: frame(b"D", b"{}"))
    started: list[ScriptedTransport] = []

    def __init__(self, request) -> None:
        self.host, self.agent = socket.socketpair()
        self.stdout_fd = self.host.fileno()
        self.sandbox_id = f"fake-{len(self.started)}"
        self.env = {"HOME": "/home/u", "PATH": "/usr/bin", "USER": "u"}
        self.network = SandboxNetwork(NetworkPolicy(), "/nonexistent")  # off: no proxy
        self.requests: list[dict] = []
        self.started.append(self)
        self.agent.sendall(frame(b"H", b'{"pid": 1}'))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buffer = b""
        try:
            while chunk := self.agent.recv(65536):
                buffer += chunk
                while len(buffer) >= 5 and len(buffer) >= 5 + struct.unpack(">I", buffer[1:5])[0]:
                    size = struct.unpack(">I", buffer[1:5])[0]
                    kind, payload, buffer = buffer[:1], buffer[5:5 + size], buffer[5 + size:]
                    if kind == b"R":
                        self.requests.append(json.loads(payload))
                        self.agent.sendall(b"".join(self.script(self.requests[-1])[:1]))
                    elif kind == b"G":
                        spec = self.requests[-1]
                        self.agent.sendall(b"".join(self.script(spec)[1:])
                                           + self.settled(spec))
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.host.sendall(data)

    def alive(self) -> bool:
        return True

    def stderr_text(self) -> str:
        return ""

    def memory_events(self) -> int:
        return 0

    def memory_note(self) -> str:
        return "memory limit"

    def close(self) -> None:
        self.host.close()
        self.agent.close()


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    ScriptedTransport.started = []
    monkeypatch.setattr(registry, "transport_class", lambda name: ScriptedTransport)
    return ScriptedTransport


def test_a_session_speaks_the_protocol_and_keeps_one_sandbox(scripted, tmp_path):
    scripted.script = staticmethod(lambda spec: [
        frame(b"A"), frame(b"O", b"out"), frame(b"E", b"err"), frame(b"X", b'{"exit": 3}')])
    with IsolatedSession(tmp_path, mode="runsc") as warm:
        first, second = warm.run("echo x"), warm.run(["ls", "-l"])
    assert (first.returncode, first.stdout, first.stderr) == (3, "out", "err")
    assert second.returncode == 3 and len(scripted.started) == 1
    assert [r["argv"] for r in scripted.started[0].requests] == [
        ["/bin/sh", "-c", "echo x"], ["ls", "-l"]]


@pytest.mark.parametrize("hostile", [
    frame(b"Z", b"junk"),                                   # an unknown frame
    b"O" + struct.pack(">I", (1 << 20) + 1),                # an oversized one
    frame(b"X", b"not json"),                               # a malformed end
    frame(b"X", b'{"exit": "0"}'),                          # an end of the wrong type
], ids=["unknown-frame", "oversized-frame", "malformed-end", "wrong-type-end"])
def test_hostile_frames_end_that_sandbox_cleanly_and_the_next_command_gets_a_fresh_one(
        scripted, tmp_path, hostile):
    scripted.script = staticmethod(lambda spec: [frame(b"A"), hostile] if "bad" in spec["argv"][-1]
                                   else [frame(b"A"), frame(b"X", b'{"exit": 0}')])
    with IsolatedSession(tmp_path, mode="runsc") as warm:
        bad = warm.run("bad", timeout=5)
        good = warm.run("fine")
    assert bad.returncode == RUNTIME_FAILURE and bad.error and not bad.success, bad
    assert good.returncode == 0 and "replaced" in good.details.get("session_note", "")
    assert len(scripted.started) == 2
    # The hostile command was sent once, to the first sandbox only: never run twice.
    assert [len(t.requests) for t in scripted.started] == [1, 1]


@pytest.mark.parametrize("settled", [
    frame(b"D", b'{"tainted": "a command lowered the sandbox\'s own limits"}'),
    frame(b"D", b"[]"),                                     # a malformed word
    frame(b"O", b"late"),                                   # output after the report
    b"",                                                    # silence
], ids=["tainted", "malformed", "unexpected-frame", "silent"])
def test_a_sandbox_not_settled_after_a_command_never_gets_the_next(scripted, tmp_path,
                                                                   monkeypatch, settled):
    """The agent undoes what a command left after the command's report; until it says it
    did, the next command is not sent there. If it cannot (or says nothing, or garbage),
    the next command runs once, in a fresh sandbox, and its result says why."""
    import gvisor_magic.warm as warm_module

    monkeypatch.setattr(warm_module, "SETTLE_TIMEOUT", 0.5)
    scripted.settled = staticmethod(lambda spec: settled if spec["argv"][-1] == "first"
                                    else frame(b"D", b"{}"))
    with IsolatedSession(tmp_path, mode="runsc") as warm:
        first = warm.run("first")
        second = warm.run("second")
        third = warm.run("third")
    assert first.returncode == second.returncode == third.returncode == 0
    assert "replaced" in second.details.get("session_note", ""), second.details
    if b"tainted" in settled:
        assert "lowered the sandbox's own limits" in second.details["session_note"]
    assert "session_note" not in third.details
    assert [[r["argv"][-1] for r in t.requests] for t in scripted.started] == [
        ["first"], ["second", "third"]]


def test_signals_and_interrupts_are_reported_by_the_one_rule(scripted, tmp_path):
    scripted.script = staticmethod(lambda spec: [frame(b"A"), frame(b"X", b'{"signal": 15}')])
    with IsolatedSession(tmp_path, mode="runsc") as warm:
        assert warm.run("kill -TERM $$").returncode == -15
