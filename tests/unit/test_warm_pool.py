"""WarmPool's rules with stand-in sandboxes: when a call gets a warm sandbox, when it runs
fresh, what is kept, what is stopped. The real sandboxes are in tests/test_reuse.py."""

from __future__ import annotations

import time

import pytest

from gvisor_magic import warm
from gvisor_magic.errors import SandboxStartError
from gvisor_magic.request import Limits, SandboxSpec


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


class FakeSandbox(warm.WarmSandbox):
    launched: list[FakeSandbox] = []
    fail = False

    def __init__(self, backend: str, spec: SandboxSpec) -> None:
        self.transport = FakeTransport()
        self.backend, self.spec = backend, spec
        self.commands, self.retired = 0, None
        self.protection = frozenset()

    @classmethod
    def launch(cls, backend: str, spec: SandboxSpec) -> FakeSandbox:
        if cls.fail:
            raise SandboxStartError(backend, "no sandbox today")
        sandbox = cls(backend, spec)
        cls.launched.append(sandbox)
        return sandbox

    @property
    def sandbox_id(self) -> str:
        return f"fake-{id(self)}"


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(warm, "WarmSandbox", FakeSandbox)
    FakeSandbox.launched, FakeSandbox.fail = [], False
    made = warm.WarmPool(idle_timeout=0.5, max_sandboxes=2)
    yield made
    made.close()


SPEC = SandboxSpec(working_dir="/w")


def test_the_first_call_of_a_spec_runs_fresh_and_the_second_starts_a_sandbox(pool):
    assert pool.take("runsc", SPEC) is None and pool.live() == 0
    second = pool.take("runsc", SPEC)
    assert second is not None and pool.live() == 1
    pool.give_back(second)
    assert pool.take("runsc", SPEC) is second, "an idle sandbox of the spec is reused"
    pool.give_back(second)
    assert len(FakeSandbox.launched) == 1


def test_specs_differing_in_anything_do_not_share(pool):
    other = SandboxSpec(working_dir="/w", limits=Limits(max_processes=7))
    for spec in (SPEC, other):
        pool.take("runsc", spec)
        pool.give_back(pool.take("runsc", spec))
    assert pool.take("docker", SPEC) is None, "another backend is another key"
    assert len(FakeSandbox.launched) == 2
    assert {s.spec for s in FakeSandbox.launched} == {SPEC, other}


def test_retired_or_dead_sandboxes_are_not_kept(pool):
    pool.take("runsc", SPEC)
    first = pool.take("runsc", SPEC)
    first.retired = "tainted"
    pool.give_back(first)
    assert first.transport.closed and pool.live() == 0
    second = pool.take("runsc", SPEC)
    second.transport.closed = True
    pool.give_back(second)
    assert pool.live() == 0 and pool.take("runsc", SPEC) is not second


def test_at_most_max_sandboxes_then_calls_run_fresh(pool):
    pool.take("runsc", SPEC)
    held = [pool.take("runsc", SPEC), pool.take("runsc", SPEC)]
    assert all(held) and pool.live() == 2
    assert pool.take("runsc", SPEC) is None, "over the cap: a fresh sandbox"
    for sandbox in held:
        pool.give_back(sandbox)
    assert pool.live() == 2


def test_idle_sandboxes_and_keys_expire(pool):
    pool.take("runsc", SPEC)
    sandbox = pool.take("runsc", SPEC)
    pool.give_back(sandbox)
    deadline = time.monotonic() + 5
    # The timer takes it out of the pool, then stops it (outside the pool's lock): wait for
    # both, not for the first.
    while (pool.live() or not sandbox.transport.closed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.live() == 0 and sandbox.transport.closed, "the idle timer stops it"
    assert pool.take("runsc", SPEC) is None, "an expired key starts over: fresh first"


def test_a_sandbox_that_cannot_start_means_a_fresh_run(pool):
    FakeSandbox.fail = True
    pool.take("runsc", SPEC)
    assert pool.take("runsc", SPEC) is None and pool.live() == 0


def test_close_stops_idle_ones_and_busy_ones_on_return(pool):
    pool.take("runsc", SPEC)
    idle, busy = pool.take("runsc", SPEC), pool.take("runsc", SPEC)
    pool.give_back(idle)
    pool.close()
    assert idle.transport.closed and not busy.transport.closed
    pool.give_back(busy)
    assert busy.transport.closed and pool.live() == 0
    assert pool.take("runsc", SPEC) is None, "a closed pool hands out nothing"
    pool.reset()
    pool.take("runsc", SPEC)
    assert pool.take("runsc", SPEC) is not None, "reset makes it usable again"


class SlowSandbox(FakeSandbox):
    """Boots in a while, and tells when it starts booting."""

    import threading as _threading

    started = _threading.Event()
    go = _threading.Event()

    @classmethod
    def launch(cls, backend: str, spec: SandboxSpec) -> FakeSandbox:
        cls.started.set()
        assert cls.go.wait(10)
        return super().launch(backend, spec)


def test_a_sandbox_prepared_ahead_of_need_is_the_next_calls_and_counts_against_the_limit(pool):
    pool.prepare("runsc", SPEC)
    [ready] = FakeSandbox.launched
    assert pool.live() == 1 and ready.ready_since is not None
    pool.prepare("runsc", SPEC)  # one idle already: nothing more
    assert len(FakeSandbox.launched) == 1
    assert pool.take("runsc", SPEC) is ready  # the first call of the key, served at once
    pool.prepare("runsc", SandboxSpec(working_dir="/other"))
    pool.prepare("runsc", SandboxSpec(working_dir="/third"))  # the pool is full
    assert pool.live() == 2 and len(FakeSandbox.launched) == 2
    pool.ready = False
    pool.give_back(ready)
    pool.close()
    pool.closed = False
    pool.prepare("runsc", SandboxSpec(working_dir="/fourth"))
    assert len(FakeSandbox.launched) == 2, "prepared with ready off"


def test_a_call_waits_for_the_sandbox_booting_for_it_and_close_stops_one_booting(pool,
                                                                                  monkeypatch):
    import threading

    monkeypatch.setattr(warm, "WarmSandbox", SlowSandbox)
    SlowSandbox.started.clear()
    SlowSandbox.go.clear()
    pool.prepare("runsc", SPEC)
    assert SlowSandbox.started.wait(10)
    got = []
    caller = threading.Thread(target=lambda: got.append(pool.take("runsc", SPEC)))
    caller.start()
    time.sleep(0.1)
    assert caller.is_alive(), "the call did not wait for the sandbox booting for it"
    SlowSandbox.go.set()
    caller.join(10)
    assert got == FakeSandbox.launched and len(got) == 1  # no second launch
    pool.give_back(got[0])
    SlowSandbox.go.clear()
    SlowSandbox.started.clear()
    other = SandboxSpec(working_dir="/other")
    pool.prepare("runsc", other)
    assert SlowSandbox.started.wait(10)
    closer = threading.Thread(target=pool.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive(), "close did not wait for the sandbox booting"
    SlowSandbox.go.set()
    closer.join(10)
    assert FakeSandbox.launched[-1].transport.closed and pool.live() == 0


def test_a_session_adopts_a_ready_sandbox_and_the_pool_prepares_another(pool):
    pool.prepare("runsc", SPEC)
    [ready] = FakeSandbox.launched
    assert pool.adopt("runsc", SandboxSpec(working_dir="/other")) is None
    assert pool.adopt("runsc", SPEC) is ready
    assert len(FakeSandbox.launched) == 2 and pool.live() == 1  # the session owns the first
