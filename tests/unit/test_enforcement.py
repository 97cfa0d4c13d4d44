"""Each backend says what bounds its limits; ``Limits.describe`` shows exactly that."""

from __future__ import annotations

import pytest

from gvisor_magic import registry
from gvisor_magic.registry import Enforcement
from gvisor_magic.request import Limits


def test_every_backend_in_the_table_says_how_it_enforces_limits() -> None:
    table = registry.enforcement()
    assert set(table) == set(registry.NAMES)
    for name, how in table.items():
        assert isinstance(how, Enforcement), name
        assert how.memory and how.cpus and how.summary, name


def test_the_fallback_never_claims_memory_or_cpu_bounds() -> None:
    how = registry.enforcement(("subprocess",))["subprocess"]
    assert how.memory.startswith("NOT enforced") and how.cpus.startswith("NOT enforced")
    line = Limits.parse({"memory": "1G", "cpus": 2}).describe({"subprocess": how})
    assert "memory 1 GiB (NOT enforced on the host)" in line
    assert "cpus 2 (NOT enforced on the host)" in line


@pytest.mark.parametrize("guard, expected", [("watchdog", "watchdog"), ("auto", None)])
def test_runsc_names_the_memory_guard_this_process_would_use(
        monkeypatch: pytest.MonkeyPatch, guard: str, expected: str | None) -> None:
    monkeypatch.setenv("GVISOR_MAGIC_MEMORY_GUARD", guard)
    how = registry.enforcement(("runsc",))["runsc"]
    assert how.memory in ("host cgroup", "watchdog")
    if expected:
        assert how.memory == expected and "watchdog" in how.summary
    assert how.cpus == "NOT enforced on runsc"


def test_describe_with_several_backends_says_where_each_differs() -> None:
    line = Limits.parse({"memory": "2G"}).describe(registry.enforcement(("docker", "subprocess")))
    assert "memory 2 GiB (docker: container cgroup; subprocess: NOT enforced on the host)" in line


def test_describe_without_a_backend_claims_nothing() -> None:
    line = Limits.parse({"memory": "2G"}).describe()
    assert "memory 2 GiB (enforcement depends on the backend)" in line
