"""The registry is the only place that names backends: a new row is a backend everywhere.

A fake backend is added as one row of ``registry.TABLE`` (and nothing else), then taken
through detection, the fallback order, ``run_command_isolated``, ``doctor --json`` and the
status widget's text form. No ``KeyError``, and no place that treats it otherwise than
its row says. Real runsc and Docker rows are left out, so nothing here starts a sandbox.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from gvisor_magic import registry
from gvisor_magic.cli import main as cli_main
from gvisor_magic.detect import BackendStatus, host_facts, preferred_backends
from gvisor_magic.errors import IsolationUnavailable, SandboxStartError
from gvisor_magic.registry import BackendEntry, Enforcement
from gvisor_magic.request import resolve_mode
from gvisor_magic.result import CommandResult
from gvisor_magic.runner import REGISTRY, detect_environment, run_command_isolated

RAN: list[str] = []
PLANNED: list[bool] = []


class FakeBackend:
    """Isolates, as its row says, and records what it ran instead of running it."""

    name = "fake"
    isolated = True

    @staticmethod
    def enforcement() -> Enforcement:
        return Enforcement(memory="fake memory bound", cpus="fake cpu bound",
                           summary="fake limits", network="fake network")

    def probe(self) -> BackendStatus:
        return BackendStatus("fake", True, True, "the fake backend always works",
                             version="fake 1.0")

    def run(self, request, on_output=None) -> CommandResult:
        RAN.append(request.display)
        PLANNED.append(request.plan is not None)
        return CommandResult(returncode=0, stdout="ran by fake\n", stderr="",
                             backend="fake", isolated=True)


class BrokenFake(FakeBackend):
    name = "fake2"

    def probe(self) -> BackendStatus:
        return BackendStatus("fake2", False, True, "the second fake never works",
                             fix="nothing to fix")

    def run(self, request, on_output=None) -> CommandResult:
        raise SandboxStartError("fake2", "the second fake never works")


@pytest.fixture
def fake_table(monkeypatch):
    module = types.ModuleType("gvisor_magic_fake.backends")
    module.FakeBackend, module.BrokenFake = FakeBackend, BrokenFake
    monkeypatch.setitem(sys.modules, "gvisor_magic_fake.backends", module)
    everywhere = (("host", 0), ("container", 0), ("other", 0))
    rows = (
        BackendEntry("fake2", "gvisor_magic_fake.backends:BrokenFake",
                     rank=(("host", -1), ("container", -1), ("other", -1))),
        BackendEntry("fake", "gvisor_magic_fake.backends:FakeBackend", rank=everywhere),
        registry.entry("subprocess"),
    )
    monkeypatch.setattr(registry, "TABLE", rows)
    REGISTRY.forget()
    RAN.clear()
    PLANNED.clear()
    yield
    REGISTRY.forget()


def test_detection_and_the_auto_order_come_from_the_row(fake_table):
    order, _ = preferred_backends(host_facts())
    assert order[:2] == ("fake2", "fake") and order[-1] == "subprocess"
    info = detect_environment(refresh=True, mode="auto")
    assert set(info.backends) == {"fake2", "fake", "subprocess"}
    assert info.auto_backend == "fake" and info.isolated
    assert "fake2: the second fake never works" in info.auto_reason
    assert "fake" in info.explain()
    assert resolve_mode("fake") == "fake"
    assert detect_environment(mode="fake").auto_backend == "fake"


def test_the_runner_runs_a_new_row_once_and_says_why(fake_table, tmp_path):
    result = run_command_isolated("echo hi", working_dir=tmp_path, reuse=False)
    assert (result.backend, result.isolated, result.stdout) == ("fake", True, "ran by fake\n")
    assert RAN == ["echo hi"]
    assert "fake2: the second fake never works" in result.fallback_reason
    # It isolates, so isolation may be required of it, and the post-run check ran.
    result = run_command_isolated("echo again", working_dir=tmp_path, mode="fake",
                                  require_isolation=True, reuse=False)
    assert result.backend == "fake" and result.fallback_reason is None
    # An isolating row gets the protection plan made before it runs, like any other.
    assert PLANNED == [True, True]
    assert RAN == ["echo hi", "echo again"]


def test_a_row_that_does_not_isolate_is_refused_when_isolation_is_required(fake_table,
                                                                          monkeypatch):
    rows = tuple(BackendEntry(r.name, r.backend, isolates=False, rank=r.rank)
                 if r.name == "fake" else r for r in registry.TABLE)
    monkeypatch.setattr(registry, "TABLE", rows)
    with pytest.raises(IsolationUnavailable, match="mode='fake' never isolates"):
        run_command_isolated("true", mode="fake", require_isolation=True)
    assert RAN == []


def test_doctor_json_lists_the_new_row(fake_table, capsys):
    assert cli_main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["auto_backend"] == "fake" and data["isolated"] is True
    assert data["backends"]["fake"]["version"] == "fake 1.0"
    assert data["limits"]["enforcement"]["fake"] == "fake limits"
    assert data["network"]["fake"] == "fake network"
    assert data["gvisor_kernel"]["can_start"] is False  # no row here can host the kernel
    assert cli_main(["doctor", "--json", "--mode", "fake"]) == 0


def test_the_widget_text_form_names_the_new_row(fake_table, shell, monkeypatch):
    from gvisor_magic.notebook.magics import IsolatedMagics

    # No warm sandbox started in the background: this is about what the widget says.
    monkeypatch.setitem(shell.config.Isolation, "prewarm", False)
    magics = IsolatedMagics(shell)
    magics.refresh_environment()
    text = magics.state.summary()
    assert "isolated by gVisor (fake)" in text
    assert magics.state.version == "fake 1.0"
    assert "fake memory bound" in (magics.state.limits or "")
