"""Bad input is refused before anything runs, each with a precise message."""

from __future__ import annotations

import math

import pytest

from gvisor_magic import InvalidRequestError, IsolationUnavailable, Limits, run_command_isolated


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    return path


CASES = [
    ({"command": ""}, InvalidRequestError, "command is empty"),
    ({"command": "   "}, InvalidRequestError, "command is empty"),
    ({"command": []}, InvalidRequestError, "command is empty"),
    ({"command": ["echo", 3]}, TypeError, r"command\[1\] must be a str"),
    ({"command": ["echo", b"x"]}, TypeError, r"command\[1\] must be a str"),
    ({"command": b"echo"}, TypeError, "not bytes"),
    ({"command": 42}, TypeError, "got int"),
    ({"command": ["ec\0ho"]}, InvalidRequestError, "NUL byte"),
    ({"command": "echo \0"}, InvalidRequestError, "NUL byte"),
    ({"command": [""]}, InvalidRequestError, "empty string"),
    ({"working_dir": "/does/not/exist"}, InvalidRequestError, "working_dir does not exist"),
    ({"repo_path": "/does/not/exist"}, InvalidRequestError, "repo_path does not exist"),
    ({"working_dir": "FILE"}, InvalidRequestError, "working_dir is not a directory"),
    ({"repo_path": "FILE"}, InvalidRequestError, "repo_path is not a directory"),
    ({"working_dir": "/"}, InvalidRequestError, "cannot be the root directory"),
    ({"working_dir": "/proc/self"}, InvalidRequestError, "cannot be inside /proc"),
    ({"timeout": 0}, InvalidRequestError, "timeout must be > 0"),
    ({"timeout": -1}, InvalidRequestError, "timeout must be > 0"),
    ({"timeout": math.nan}, InvalidRequestError, "NaN"),
    ({"timeout": math.inf}, InvalidRequestError, "use None"),
    ({"timeout": "10"}, TypeError, "timeout must be a number"),
    ({"timeout": True}, TypeError, "timeout must be a number"),
    ({"mode": "firecracker"}, InvalidRequestError, "unknown mode 'firecracker'"),
    ({"env": {"1BAD": "x"}}, InvalidRequestError, "invalid environment variable name '1BAD'"),
    ({"env": {"A=B": "x"}}, InvalidRequestError, "invalid environment variable name"),
    ({"env": {"": "x"}}, InvalidRequestError, "invalid environment variable name"),
    ({"env": {"OK": 1}}, TypeError, r"env\['OK'\] must be a str"),
    ({"env": {"OK": "a\0b"}}, InvalidRequestError, "NUL byte"),
    ({"env": ["A=B"]}, TypeError, "env must be a mapping"),
    ({"stdin": 5}, TypeError, "stdin must be str, bytes or None"),
    ({"network": 42}, InvalidRequestError, "network must be False, True, 'host', a preset"),
    ({"network": "https://pypi.org/simple"}, InvalidRequestError, "not a URL"),
    ({"network": ["pypi", "host"]}, InvalidRequestError, "cannot be combined"),
    # hosts add to "public" through --allow-host (NetworkPolicy.combined), not in one list
    ({"network": ["public", "127.0.0.1:8081"]}, InvalidRequestError,
     r"'public' cannot be combined with hosts: use it alone \(hosts add to 'public' "
     r"through --allow-host\)"),
    ({"max_output": 0}, InvalidRequestError, "max_output must be a positive"),
    ({"require_isolation": "yes"}, TypeError, "require_isolation must be"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), CASES,
                         ids=[f"{next(iter(c[0]))}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_refused_before_running(overrides, error, message, a_file, tmp_path):
    marker = tmp_path / "ran"
    kwargs = {"command": f"touch {marker}", "mode": "subprocess"}
    kwargs.update({k: (str(a_file) if v == "FILE" else v) for k, v in overrides.items()})
    with pytest.raises(error, match=message):
        run_command_isolated(**kwargs)
    assert not marker.exists(), "the command ran although its input was refused"


def test_invalid_mode_from_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("GVISOR_MAGIC_MODE", "vm")
    with pytest.raises(InvalidRequestError, match="unknown GVISOR_MAGIC_MODE 'vm'"):
        run_command_isolated("true")


def test_invalid_require_isolation_variable(monkeypatch):
    monkeypatch.setenv("GVISOR_MAGIC_REQUIRE_ISOLATION", "maybe")
    with pytest.raises(InvalidRequestError, match="GVISOR_MAGIC_REQUIRE_ISOLATION='maybe'"):
        run_command_isolated("true")


def test_require_isolation_with_subprocess_mode_is_a_contradiction(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(IsolationUnavailable, match="never isolates"):
        run_command_isolated(f"touch {marker}", mode="subprocess", require_isolation=True)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["max_processes", "max_open_files", "max_file_size",
                                   "max_address_space"])
def test_limits_are_validated(field):
    with pytest.raises(InvalidRequestError, match=f"limits.{field}"):
        Limits(**{field: 0})
    with pytest.raises(TypeError, match="limits must be"):
        run_command_isolated("true", mode="subprocess", limits={field: 1})
