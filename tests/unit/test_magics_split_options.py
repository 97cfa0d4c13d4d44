"""How ``%isolated`` splits its line into options and the command, without IPython (the magic
itself: tests/test_magics_line.py, tests/test_magics_usage.py)."""

from __future__ import annotations


def test_split_options_reads_only_the_front_of_the_line():
    from gvisor_magic.notebook.magics import split_options

    assert split_options("--mode docker --timeout 5 ls -l | wc") == (
        ["--mode", "docker", "--timeout", "5"], "ls -l | wc")
    assert split_options("--quiet -- --help") == (["--quiet"], "--help")
    assert split_options("echo 'it''s' \"$HOME\" --mode x") == (
        [], "echo 'it''s' \"$HOME\" --mode x")
    assert split_options("--env 'A=b c' echo \"unbalanced") == (["--env", "A=b c"],
                                                                "echo \"unbalanced")
    assert split_options("--limit=memory=1G true") == (["--limit=memory=1G"], "true")
    assert split_options("  --quiet  ") == (["--quiet"], "")
