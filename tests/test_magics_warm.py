"""The kernel's warm sandbox: cells share one, ``%isolation restart`` and ``--fresh``, and a
cell that needs another sandbox says that its /tmp and HOME are gone."""

from __future__ import annotations

from support.ipython_shell import magics, run


def test_cells_share_one_warm_sandbox_and_restart_replaces_it(ip, capfd, runsc_works):
    run(ip, "%%isolated --result first\necho kept > /tmp/note")
    run(ip, "%%isolated --result second\ncat /tmp/note")
    first, second = ip.user_ns["first"], ip.user_ns["second"]
    assert second.stdout == "kept\n"
    assert first.details["session"] == second.details["session"]
    assert magics(ip).sessions.describe() == "warm (runsc)"
    run(ip, "%isolation restart")
    assert "replaced" in capfd.readouterr().out
    run(ip, "%%isolated --result third --no-raise-error\ncat /tmp/note")
    third = ip.user_ns["third"]
    assert third.returncode == 1 and third.details["session"] != first.details["session"]


def test_fresh_runs_in_a_one_shot_sandbox(ip, capfd, runsc_works):
    run(ip, "%%isolated --result warm\necho in-session > /tmp/note")
    run(ip, "%%isolated --fresh --result fresh --no-raise-error\ncat /tmp/note; uname -r")
    fresh = ip.user_ns["fresh"]
    assert "session" not in fresh.details and "sandbox_id" in fresh.details
    assert fresh.stdout == "4.4.0\n" and "No such file" in fresh.stderr


def test_max_output_applies_to_the_warm_sandbox(ip, capfd, runsc_works):
    run(ip, "%config Isolation.max_output = 1000")
    run(ip, "%%isolated --out log --result noisy --quiet\nseq 100000")
    assert len(ip.user_ns["log"]) == 1000 and ip.user_ns["noisy"].truncated
    assert "session" in ip.user_ns["noisy"].details  # the warm sandbox, not a one-shot run


def test_a_cell_that_needs_another_sandbox_says_its_tmp_is_gone(ip, capfd, runsc_works):
    """The kernel keeps one warm sandbox: a cell with other options replaces it, and says
    that what the previous one kept in /tmp and HOME is not there (never silently)."""
    run(ip, "%%isolated --quiet\necho kept > /tmp/state\n")
    run(ip, "%%isolated --quiet\ncat /tmp/state\n")
    assert "kept" in capfd.readouterr().out
    # A cell on another backend runs one-shot there and leaves the warm sandbox alone.
    run(ip, "%%isolated --quiet --mode subprocess\ntrue\n")
    run(ip, "%%isolated --quiet\ncat /tmp/state\n")
    out, err = capfd.readouterr()
    assert "kept" in out and "another sandbox" not in err
    run(ip, "%%isolated --quiet --no-raise-error --limit max_open_files=1000\ncat /tmp/state\n")
    err = capfd.readouterr().err
    assert "needs another sandbox" in err and "other limits" in err, err
    assert "/tmp and HOME" in err
    run(ip, "%%isolated --quiet --limit max_open_files=1000\ntrue\n")
    assert "another sandbox" not in capfd.readouterr().err
