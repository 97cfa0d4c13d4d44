"""``%isolation on|off`` (and ``Isolation.route_bang``): ``!cmd``, ``%sx`` and the script cells
routed through the sandbox while ``%pip`` stays on the host, and everything restored exactly
when routing is turned off or the extension unloaded."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest
from IPython.core.error import UsageError
from IPython.utils.text import SList
from support.ipython_shell import HOST_RELEASE, RUNSC_OK, SANDBOX_RELEASE, badges, magics, run


def _pip_entry(shell):
    return shell.magics_manager.magics["line"]["pip"]


def test_routing_sends_bang_commands_to_the_sandbox(ip, capfd, runsc_works):
    run(ip, "%isolation on")
    said, err = capfd.readouterr()
    assert err == "" and said.startswith("[gvisor-magic] routing on.\n")
    assert "In the sandbox: !cmd, !!cmd, x = !cmd, %sx, and the script cells %%bash" in said
    assert "%%script PROGRAM" in said and "Python\n                  code itself" in said

    run(ip, "y = !uname -r")
    assert ip.user_ns["y"] == [SANDBOX_RELEASE] and isinstance(ip.user_ns["y"], SList)
    assert capfd.readouterr().err == "" and badges(ip) == [RUNSC_OK]

    assert run(ip, "!!uname -r") == [SANDBOX_RELEASE]
    assert run(ip, "%sx uname -r") == [SANDBOX_RELEASE]

    run(ip, "!uname -r")
    assert capfd.readouterr().out.endswith(f"{SANDBOX_RELEASE}\n")

    ip.user_ns["word"] = "expanded"
    run(ip, "!echo $word {1+1}")
    assert capfd.readouterr().out == "expanded 2\n"

    run(ip, "!exit 5")
    assert ip.user_ns["_exit_code"] == 5
    assert badges(ip)[-1] == "[gvisor-magic] runsc (gVisor): exit 5"


def test_pip_stays_on_the_host_while_routing_is_on(ip, capfd, runsc_works):
    run(ip, "%isolation on")
    capfd.readouterr()
    run(ip, "%pip --version")
    out, err = capfd.readouterr()
    assert re.search(r"^pip \S+ from " + re.escape(sys.prefix) + r"/", out, re.M), out
    assert "[gvisor-magic]" not in out + err  # not a sandboxed run
    # and routing is still on for everything else
    assert run(ip, "!!uname -r") == [SANDBOX_RELEASE]
    assert getattr(_pip_entry(ip), "__wrapped__", None) is not None


def test_isolation_off_restores_system_exactly(ip, capfd, runsc_works):
    shell_type = type(ip)
    run(ip, "%isolation on")
    assert "system" in ip.__dict__ and "getoutput" in ip.__dict__
    run(ip, "%isolation off")
    assert "run on the host again" in capfd.readouterr().out
    assert "system" not in ip.__dict__ and "getoutput" not in ip.__dict__
    assert ip.system.__func__ is shell_type.system
    assert ip.getoutput.__func__ is shell_type.getoutput
    assert getattr(_pip_entry(ip), "__wrapped__", None) is None
    assert run(ip, "!!uname -r") == [HOST_RELEASE]
    capfd.readouterr()
    run(ip, "%pip --version")
    out, err = capfd.readouterr()
    assert out.startswith("pip ") and "[gvisor-magic]" not in err


SCRIPT_CELLS = ("bash", "sh", "script", "python3")


@pytest.mark.parametrize("cell, out", [
    ("%%bash\nuname -r\necho \"$0\"\n", f"{SANDBOX_RELEASE}\nbash\n"),
    ("%%sh\nuname -r\n", f"{SANDBOX_RELEASE}\n"),
    ("%%script bash --norc\nuname -r\n", f"{SANDBOX_RELEASE}\n"),
    ("%%script sh\nuname -r\n", f"{SANDBOX_RELEASE}\n"),
    ("%%python3\nimport os\nprint(os.uname().release)\n", f"{SANDBOX_RELEASE}\n"),
], ids=["bash", "sh", "script-bash", "script-sh", "python3"])
def test_routing_sends_script_cells_to_the_sandbox(ip, capfd, runsc_works, cell, out):
    run(ip, "%isolation on")
    capfd.readouterr()
    run(ip, cell)
    assert capfd.readouterr() == (out, "") and badges(ip) == [RUNSC_OK]
    run(ip, "%isolation off")
    capfd.readouterr()
    run(ip, cell)  # on the host again, by IPython's own magic
    assert SANDBOX_RELEASE not in capfd.readouterr().out and badges(ip) == []


def test_routed_script_cells_keep_their_options(ip, capfd, tmp_path, runsc_works):
    run(ip, "%isolation on")
    capfd.readouterr()
    run(ip, "%%bash --out o --err e\necho out; echo err >&2; uname -r\n")
    assert capfd.readouterr() == ("", "")
    assert (ip.user_ns["o"], ip.user_ns["e"]) == (f"out\n{SANDBOX_RELEASE}\n", "err\n")
    with pytest.raises(subprocess.CalledProcessError) as caught:
        run(ip, "%%bash\necho partial\nexit 3\n")
    assert caught.value.returncode == 3 and ip.user_ns["_exit_code"] == 3
    run(ip, "%%bash --no-raise-error\nexit 4\n")
    assert ip.user_ns["_exit_code"] == 4
    assert badges(ip)[-1] == "[gvisor-magic] runsc (gVisor): exit 4"
    capfd.readouterr()
    for cell in ("%%bash --bg\ntouch ran\n", "%%script --proc p bash\ntouch ran\n"):
        with pytest.raises(UsageError, match="cannot be handed back from the sandbox"):
            run(ip, cell)
    with pytest.raises(UsageError, match="%%script needs a program"):
        run(ip, "%%script\ntouch ran\n")
    assert not (tmp_path / "ran").exists()


def test_unload_restores_system_and_the_magics_tables(ip, capfd, runsc_works):
    shell_type = type(ip)
    settings = magics(ip).settings
    run(ip, "%isolation on")
    run(ip, "%unload_ext gvisor_magic")
    assert "system" not in ip.__dict__ and "getoutput" not in ip.__dict__
    assert ip.system.__func__ is shell_type.system
    assert ip.getoutput.__func__ is shell_type.getoutput
    assert getattr(_pip_entry(ip), "__wrapped__", None) is None
    assert "isolated" not in ip.magics_manager.magics["cell"]
    for name in SCRIPT_CELLS:
        assert getattr(ip.magics_manager.magics["cell"][name], "__wrapped__", None) is None
    assert "isolated" not in ip.magics_manager.magics["line"]
    assert "isolation" not in ip.magics_manager.magics["line"]
    assert "IsolatedMagics" not in ip.magics_manager.registry
    assert settings not in ip.configurables
    assert run(ip, "!!uname -r") == [HOST_RELEASE]
    capfd.readouterr()
    run(ip, "%pip --version")
    assert capfd.readouterr().out.startswith("pip ")
    run(ip, "%load_ext gvisor_magic")  # for the fixture, and: loading again works
    run(ip, "%%isolated --quiet\nuname -r\n")
    assert capfd.readouterr().out.endswith(f"{SANDBOX_RELEASE}\n")


def test_routing_keeps_and_restores_an_earlier_instance_override(ip, capfd, runsc_works):
    calls = []

    def earlier_system(self, cmd):
        calls.append(cmd)

    earlier = ip.system = types.MethodType(earlier_system, ip)
    try:
        run(ip, "%isolation on")
        capfd.readouterr()
        run(ip, "!uname -r")
        assert calls == [] and capfd.readouterr().out == f"{SANDBOX_RELEASE}\n"
        run(ip, "%pip --version")  # on the host: through the shell's own system
        assert len(calls) == 1 and calls[0].endswith("-m pip --version")
        run(ip, "%isolation off")
        assert ip.__dict__["system"] is earlier and "getoutput" not in ip.__dict__
        run(ip, "!echo after-off")
        assert calls[-1] == "echo after-off"
        run(ip, "%isolation on")
        run(ip, "%unload_ext gvisor_magic")
        assert ip.__dict__["system"] is earlier
        run(ip, "%load_ext gvisor_magic")
    finally:
        ip.__dict__.pop("system", None)


def test_config_route_bang_turns_routing_on_and_off(ip, runsc_works):
    run(ip, "%config Isolation.route_bang = True")
    assert "system" in ip.__dict__
    assert run(ip, "!!uname -r") == [SANDBOX_RELEASE]
    run(ip, "%config Isolation.route_bang = False")
    assert "system" not in ip.__dict__
    assert run(ip, "!!uname -r") == [HOST_RELEASE]
