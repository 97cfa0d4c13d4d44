"""Choosing a backend, falling back honestly, and never running a command twice."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time

import psutil
import pytest

from gvisor_magic import (
    IsolationUnavailable,
    detect_environment,
    is_gvisor_available,
    run_command_isolated,
)

BROKEN_RUNSC = [("/bin/false", "exit"), ("/nonexistent/bin/runsc", "No such file")]


@pytest.mark.parametrize(("runsc", "words"), BROKEN_RUNSC)
def test_auto_falls_back_with_a_reason_and_runs_once(monkeypatch, tmp_path, runsc, words):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", runsc)
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    marker = tmp_path / "runs.log"
    result = run_command_isolated(f"echo ran >> {marker}; echo done", working_dir=tmp_path,
                                  mode="auto")
    assert result.stdout == "done\n"
    assert result.backend == "subprocess" and not result.isolated
    assert "runsc" in result.fallback_reason and words in result.fallback_reason
    assert "docker" in result.fallback_reason  # tried, and said why not
    assert marker.read_text() == "ran\n"
    assert not is_gvisor_available()


def test_broken_runsc_falls_back_to_docker_when_docker_works(monkeypatch, tmp_path,
                                                              docker_works):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", "/bin/false")
    marker = tmp_path / "runs.log"
    result = run_command_isolated(f"echo ran >> {marker}; uname -r", working_dir=tmp_path,
                                  mode="auto")
    assert (result.backend, result.isolated, result.stdout) == ("docker", True, "4.4.0\n")
    assert "runsc" in result.fallback_reason
    assert marker.read_text() == "ran\n"


@pytest.mark.parametrize(("runsc", "words"), BROKEN_RUNSC)
def test_explicit_runsc_or_required_isolation_raises(monkeypatch, tmp_path, runsc, words):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", runsc)
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    marker = tmp_path / "ran"
    with pytest.raises(IsolationUnavailable, match="runsc") as caught:
        run_command_isolated(f"touch {marker}", mode="runsc")
    assert words in caught.value.reasons["runsc"]
    with pytest.raises(IsolationUnavailable, match="isolation is required") as caught:
        run_command_isolated(f"touch {marker}", require_isolation=True)
    assert "runsc" in caught.value.reasons
    monkeypatch.setenv("GVISOR_MAGIC_REQUIRE_ISOLATION", "1")
    with pytest.raises(IsolationUnavailable):
        run_command_isolated(f"touch {marker}")
    assert not marker.exists()


def test_failure_after_start_is_reported_not_retried(runsc_works, tmp_path):
    marker = tmp_path / "runs.log"
    result = run_command_isolated(f"echo ran >> {marker}; exit 3", working_dir=tmp_path,
                                  mode="auto")
    assert result.returncode == 3 and result.isolated
    assert marker.read_text() == "ran\n"


def test_sandbox_killed_mid_command_is_reported_not_rerun(runsc_works, tmp_path):
    """SIGKILL the gVisor sandbox process itself while the command runs."""
    marker = tmp_path / "runs.log"
    seen = threading.Event()

    def kill_sandbox() -> None:
        seen.wait(30)
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if any(tempfile.gettempdir() in part for part in cmdline) and "boot" in cmdline:
                os.kill(process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_sandbox)
    killer.start()
    start = time.monotonic()
    # writes="direct": the marker is how the host sees each run, and a killed command's
    # held writes would be discarded.
    result = run_command_isolated(f"echo ran >> {marker}; echo started; sleep 60",
                                  working_dir=tmp_path, mode="auto", timeout=120,
                                  on_output=lambda s, t: seen.set(), writes="direct")
    killer.join()
    assert time.monotonic() - start < 60
    assert result.backend == "runsc" and result.isolated
    assert not result.success
    assert result.stdout == "started\n"
    assert marker.read_text() == "ran\n", "the command must not run again after a sandbox crash"
    assert result.error and "sandbox ended" in result.error


def test_detect_environment_reports_every_backend(runsc_works):
    info = detect_environment(refresh=True)
    runsc = info.backends["runsc"]
    assert runsc.available and runsc.version.startswith("runsc version")
    assert info.backends["subprocess"].available and not info.backends["subprocess"].isolated
    assert info.auto_backend in ("runsc", "docker")
    assert info.isolated
    assert info.platform.startswith("linux")
    assert isinstance(info.in_container, bool) and isinstance(info.in_kubernetes, bool)
    assert info.in_container == (os.path.exists("/.dockerenv") or info.in_container)
    assert not info.pod_runs_gvisor
    text = info.explain()
    assert "runsc" in text and "ISOLATED" in text
    assert is_gvisor_available()


def test_forced_subprocess_mode_is_never_reported_as_isolated(monkeypatch):
    monkeypatch.setenv("GVISOR_MAGIC_MODE", "subprocess")
    result = run_command_isolated("true")
    assert result.backend == "subprocess" and not result.isolated
    assert "subprocess" in result.fallback_reason
    info = detect_environment()
    assert info.auto_backend == "subprocess" and not info.isolated
    assert "NOT ISOLATED" in info.explain()


def test_decisions_are_logged_with_the_word_gvisor(runsc_works, caplog, monkeypatch):
    monkeypatch.setenv("GVISOR_MAGIC_RUNSC", "/bin/false")
    monkeypatch.setenv("GVISOR_MAGIC_DOCKER_RUNTIME", "no-such-runtime")
    with caplog.at_level("INFO", logger="gvisor_magic"):
        run_command_isolated("true")
    messages = [r.getMessage() for r in caplog.records if r.name == "gvisor_magic"]
    assert messages and all("gvisor" in m.lower() for m in messages)
    assert any("NOT isolated" in m for m in messages)


def test_kubernetes_pod_prefers_runsc_directly(monkeypatch):
    from gvisor_magic.detect import host_facts, preferred_backends

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    facts = host_facts()
    assert facts.in_kubernetes and facts.in_container
    assert "KUBERNETES_SERVICE_HOST is set" in facts.evidence
    order, why = preferred_backends(facts)
    assert order[0] == "runsc" and "pod" in why


def test_a_linux_host_prefers_docker_then_runsc():
    from gvisor_magic.detect import HostFacts, preferred_backends

    host = HostFacts(platform="linux", machine="x86_64", is_linux=True, is_root=True,
                     in_container=False, in_kubernetes=False, pod_runs_gvisor=False)
    order, why = preferred_backends(host)
    assert order == ("docker", "runsc", "subprocess") and "Docker" in why
    mac = HostFacts(platform="darwin", machine="arm64", is_linux=False, is_root=False,
                    in_container=False, in_kubernetes=False, pod_runs_gvisor=False)
    order, why = preferred_backends(mac)
    assert order == ("subprocess",) and "only on Linux" in why
