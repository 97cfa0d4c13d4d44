"""docker-py's private names are used in one module, with a tested, pinned range."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from gvisor_magic.backends import docker_api

ROOT = Path(__file__).resolve().parents[2]


def test_the_pin_is_the_tested_range_and_the_installed_release_is_in_it():
    pins = re.findall(r'^\s*"(docker[<>=!,.0-9]*)"', (ROOT / "pyproject.toml").read_text(),
                      re.MULTILINE)
    assert pins == [f"docker{docker_api.TESTED_RANGE}"]
    major = int(version("docker").split(".")[0])
    assert 7 <= major < 8


def test_a_docker_py_without_the_private_calls_fails_with_a_clear_error():
    class NewerApi:
        _version = "9.0"

    with pytest.raises(RuntimeError, match=r"tested with docker>=7\.0,<8"):
        docker_api.register_removal_wait(NewerApi(), "abc")


def test_no_other_module_uses_docker_py_private_names():
    pattern = re.compile(r"\bapi\._[a-z]|\._sock\b")
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "gvisor_magic").rglob("*.py")
                 if path.name != "docker_api.py" and pattern.search(path.read_text())]
    assert offenders == []
