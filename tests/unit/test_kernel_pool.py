"""The kernel pool's bookkeeping, with stand-in kernels (the real ones:
tests/test_gvisor_kernel_pool.py): at most ``max_pooled`` in all, the oldest of another
recipe gives way, a failing recipe is not retried at once, an unclaimed one expires, and a
dead one is never handed out."""

from __future__ import annotations

import threading
import time

import pytest

from gvisor_magic.kernel import pool as pool_module
from gvisor_magic.kernel.pool import KernelPool, PooledKernel, Recipe
from gvisor_magic.request import SandboxSpec


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class FakeKernel(PooledKernel):
    def shut_down(self, wait: float = 30.0) -> None:
        self.process.returncode = -15
        STOPPED.append(self.process.pid)


STOPPED: list[int] = []


def recipe(work) -> Recipe:
    return Recipe.of(SandboxSpec(working_dir=str(work)), ["python", "-m", "ipykernel_launcher"],
                     {"PATH": "/bin"}, None)


@pytest.fixture
def pool(monkeypatch):
    STOPPED.clear()
    counter = iter(range(1000, 2000))
    failing: set[Recipe] = set()

    def start(r: Recipe):
        if r in failing:
            return None
        return FakeKernel(r, "/nonexistent", FakeProcess(next(counter)), -1,
                          time.monotonic(), {})

    monkeypatch.setattr(pool_module, "start_pooled", start)
    made = KernelPool(idle=600.0, max_pooled=2)
    made.failing = failing  # type: ignore[attr-defined]
    yield made
    made.close()


def settle(pool: KernelPool) -> None:
    deadline = time.monotonic() + 10
    while pool.starting() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_recipe_gets_what_was_started_for_it_and_nothing_else(pool, tmp_path):
    a, b = recipe(tmp_path / "a"), recipe(tmp_path / "b")
    pool.fill(a, 1)
    settle(pool)
    assert pool.take(b) is None
    found = pool.take(a)
    assert found is not None and found.recipe == a
    assert pool.take(a) is None, "one kernel was handed out twice"


def test_the_pool_holds_at_most_max_pooled_and_the_oldest_other_recipe_gives_way(pool,
                                                                                 tmp_path):
    a, b, c = (recipe(tmp_path / n) for n in "abc")
    pool.fill(a, 1)
    settle(pool)
    pool.fill(b, 1)
    settle(pool)
    [oldest] = [e.process.pid for e in pool.ready() if e.recipe == a]
    pool.fill(c, 1)
    settle(pool)
    time.sleep(0.1)  # the eviction's shut down runs on a thread of its own
    assert len(pool.ready()) == 2 and oldest in STOPPED
    assert {e.recipe for e in pool.ready()} == {b, c}
    pool.fill(c, 5)  # never more than max_pooled of one recipe either
    settle(pool)
    assert len(pool.ready()) <= 2


def test_a_recipe_whose_kernel_failed_to_start_is_not_retried_at_once(pool, tmp_path):
    a = recipe(tmp_path / "a")
    pool.failing.add(a)
    pool.fill(a, 1)
    settle(pool)
    pool.failing.clear()
    pool.fill(a, 1)
    settle(pool)
    assert pool.ready() == [], "a failing recipe was started again at once"


def test_a_dead_pooled_kernel_is_never_handed_out(pool, tmp_path):
    a = recipe(tmp_path / "a")
    pool.fill(a, 1)
    settle(pool)
    [entry] = pool.ready()
    entry.process.returncode = 137
    assert pool.take(a) is None
    assert entry.process.pid in STOPPED, "what the dead kernel left was not removed"


def test_an_unclaimed_kernel_is_shut_down_after_the_idle_time(monkeypatch, pool, tmp_path):
    pool.idle = 0.2
    a = recipe(tmp_path / "a")
    pool.fill(a, 1)
    settle(pool)
    [entry] = pool.ready()
    deadline = time.monotonic() + 10
    while pool.ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.ready() == [] and entry.process.pid in STOPPED


def slow_start(go: threading.Event, pid: int):
    """A stand-in start that ends once ``go`` is set, with a kernel of pid ``pid``."""
    def start(r: Recipe):
        go.wait(5)
        return FakeKernel(r, "/nonexistent", FakeProcess(pid), -1, time.monotonic(), {})
    return start


def test_closing_waits_for_kernels_still_starting_and_stops_them(monkeypatch, tmp_path):
    STOPPED.clear()
    go = threading.Event()
    monkeypatch.setattr(pool_module, "start_pooled", slow_start(go, 4242))
    made = KernelPool()
    made.fill(recipe(tmp_path), 1)
    assert made.starting() == 1
    threading.Timer(0.2, go.set).start()
    made.close()
    assert made.starting() == 0 and STOPPED == [4242] and made.ready() == []


def test_the_recipe_leaves_out_what_belongs_to_one_kernel(tmp_path):
    spec = SandboxSpec(working_dir=str(tmp_path))
    one = Recipe.of(spec, ["python"], {"PATH": "/bin", "JPY_SESSION_NAME": "a.ipynb"}, None)
    two = Recipe.of(spec, ["python"], {"PATH": "/bin", "JPY_SESSION_NAME": "b.ipynb"}, None)
    assert one == two
    assert one != Recipe.of(spec, ["python"], {"PATH": "/usr/bin"}, None)
    assert one != Recipe.of(SandboxSpec(working_dir=str(tmp_path / "x")), ["python"],
                            {"PATH": "/bin"}, None)


def test_a_start_waits_for_a_kernel_of_its_recipe_still_starting(monkeypatch, tmp_path):
    go = threading.Event()
    monkeypatch.setattr(pool_module, "start_pooled", slow_start(go, 4343))
    made = KernelPool()
    try:
        made.fill(recipe(tmp_path), 1)
        assert made.take(recipe(tmp_path / "other"), wait=5) is None  # another recipe: no wait
        threading.Timer(0.2, go.set).start()
        found = made.take(recipe(tmp_path), wait=5)
        assert found is not None and found.process.pid == 4343
    finally:
        made.close()
