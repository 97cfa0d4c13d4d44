"""Helpers where they belong, checked without a sandbox: the session agent's wire is one
set of objects on both ends and the agent's shipped source defines every name it uses;
the post-run epilogue says what the one-shot, pool and session paths said; run dirs are
named after their maker and reclaimed once it is gone."""

from __future__ import annotations

import builtins
import os
import stat
import symtable
import time
from pathlib import Path

from gvisor_magic import agent_channel, run_dirs
from gvisor_magic.backends import transports
from gvisor_magic.postrun import check_after_run, epilogue
from gvisor_magic.protected import (
    HIDDEN,
    READ_ONLY,
    SCRUBBED,
    Protection,
    ProtectionPlan,
    protection_details,
)
from gvisor_magic.result import CommandResult
from gvisor_magic.sandboxed import agent_wire

SANDBOXED = Path(agent_wire.__file__).parent


def undefined_names(source: str) -> set[str]:
    """Global names that ``source`` reads but neither it nor the builtins define."""
    defined, used = set(dir(builtins)), set()

    def visit(table: symtable.SymbolTable) -> None:
        module = table.get_type() == "module"
        for symbol in table.get_symbols():
            name = symbol.get_name()
            if module or symbol.is_global():
                if symbol.is_assigned() or symbol.is_imported() or (
                        module and symbol.is_namespace()):
                    defined.add(name)
                if symbol.is_referenced():
                    used.add(name)
        for child in table.get_children():
            visit(child)

    visit(symtable.symtable(source, "<agent>", "exec"))
    return used - defined


def test_the_shipped_agent_defines_every_name_it_uses():
    assert undefined_names(transports.AGENT_SOURCE) == set()
    alone = (SANDBOXED / "session_agent.py").read_text()
    assert {"RUN", "MAX_FRAME", "pack_frame", "parse_egress"} <= undefined_names(alone), \
        "the check sees names that come from the sources put in front"


def test_the_wire_is_one_set_of_objects_on_both_ends():
    for name in ("RUN", "GO", "KILL", "HELLO", "ACCEPTED", "STDOUT", "STDERR", "EXIT",
                 "FROM_AGENT", "MAX_FRAME"):
        assert getattr(agent_channel, name) is getattr(agent_wire, name), name
    assert transports.AGENT_SOURCE.index(agent_wire.__doc__.splitlines()[0]) \
        < transports.AGENT_SOURCE.index("PID 1 of a warm sandbox")


def test_the_agent_source_runs_with_the_wire_in_front_and_imports_on_the_host():
    namespace: dict[str, object] = {"__name__": "gvisor_agent_under_test"}
    exec(compile(transports.AGENT_SOURCE, "<agent>", "exec"), namespace)  # defines only
    assert namespace["MAX_FRAME"] == agent_wire.MAX_FRAME
    frame = namespace["pack_frame"](b"X", b'{"exit": 0}')
    assert frame[:agent_wire.WIRE_HEADER.size] == b"X" + (11).to_bytes(4, "big")
    assert agent_wire.parse_header(frame[:5]) == (b"X", 11)
    import gvisor_magic.sandboxed.session_agent as agent  # the wheel test does this

    assert callable(agent.read_frame)


def test_a_frame_crosses_the_host_channel():
    class Loop:
        def __init__(self) -> None:
            self.stdout_fd, self._w = os.pipe()

        def send(self, data: bytes) -> None:
            os.write(self._w, data)

    loop = Loop()
    channel = agent_channel.Channel(loop)
    try:
        channel.send(agent_wire.EXIT, b"{}")
        assert channel.receive(time.monotonic() + 5) == (agent_wire.EXIT, b"{}")
    finally:
        os.close(loop.stdout_fd)
        os.close(loop._w)


def _plan(root: Path) -> ProtectionPlan:
    return ProtectionPlan(
        protections=[Protection(str(root / ".ssh"), HIDDEN, True, "dir", "keys"),
                     Protection(str(root / ".bashrc"), READ_ONLY, True, "file", "runs"),
                     Protection(str(root / ".npmrc"), SCRUBBED, True, "file", "token", "x")],
        relaxed=(".profile",), note="a note")


def _result() -> CommandResult:
    return CommandResult(0, "", "", "runsc", True, details={"session": "s-1"})


def test_the_epilogue_says_what_the_pool_and_the_session_said(tmp_path):
    plan = _plan(tmp_path)
    since = time.time()
    extra = {"sandbox_id": "gvisor-magic-abc", "reused": "call 2"}
    result = _result()
    epilogue(result, working_dir=str(tmp_path), since=since, plan=plan, mounted=plan,
             etc_scrubbed=["/etc/pip.conf"], extra=extra)
    before = {"session": "s-1", **protection_details(plan, ["/etc/pip.conf"]), **extra,
              **check_after_run(str(tmp_path), since, plan)}
    assert list(result.details.items()) == list(before.items())
    assert result.details["scrubbed"] == f"{tmp_path / '.npmrc'}, /etc/pip.conf"
    assert result.details["relaxed_protection"] == ".profile"


def _setid_file(directory: Path) -> tuple[Path, float]:
    """A file made set-user-ID after ``since``, as a command in the sandbox would."""
    tool = directory / "tool"
    tool.write_text("#!/bin/sh\n")
    since = time.time() - 1
    tool.chmod(0o4755)
    return tool, since


def test_the_epilogue_of_a_one_shot_adds_only_the_check(tmp_path):
    tool, since = _setid_file(tmp_path)
    result = _result()
    epilogue(result, working_dir=str(tmp_path), since=since, plan=_plan(tmp_path))
    assert result.details == {"session": "s-1", "stripped_setid": str(tool)}
    assert not tool.stat().st_mode & stat.S_ISUID


def test_the_epilogue_checks_without_a_result_and_not_for_the_host(tmp_path):
    tool, since = _setid_file(tmp_path)
    host = _result()
    epilogue(host, working_dir=str(tmp_path), since=since, plan=None, isolated=False)
    assert host.details == {"session": "s-1"} and tool.stat().st_mode & stat.S_ISUID
    epilogue(None, working_dir=str(tmp_path), since=since, plan=None)  # raised: no result
    assert not tool.stat().st_mode & stat.S_ISUID


def test_run_dirs_are_named_after_their_maker_and_reclaimed_after_it(tmp_path):
    mine = run_dirs.make_run_dir(str(tmp_path))
    assert run_dirs.owner_of(os.path.basename(mine)) == os.getpid()
    assert run_dirs.run_dirs_of(os.getpid(), str(tmp_path)) == [mine]
    dead = 2 ** 22 + 17  # above Linux's default pid_max: no such process
    left = tmp_path / f"{run_dirs.PREFIX}{dead}-x1y2"
    (left / "state").mkdir(parents=True)
    (tmp_path / "gvisor-magic-kernel-1-x").mkdir()  # not a run dir: left alone
    assert run_dirs.owner_of(left.name) == dead
    assert run_dirs.owner_of("gvisor-magic-kernel-1-x") is None
    again = run_dirs.make_run_dir(str(tmp_path))
    assert not left.exists() and os.path.isdir(mine) and os.path.isdir(again)
    assert (tmp_path / "gvisor-magic-kernel-1-x").is_dir()
