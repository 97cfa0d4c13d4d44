"""``SandboxSpec.from_options``, the one reader of sandbox settings, and ``parse_pairs``, the
one reader of ``KEY=VALUE`` text: every setting, typed and as text, the messages of bad
input, the JSON a kernel's launcher reads, and the same settings through the magics, the
CLI and the kernel ending at the same spec. Nothing here starts a sandbox."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
from traitlets import TraitError
from traitlets.config import Config, Configurable

from gvisor_magic import InvalidRequestError, Limits, SandboxSpec
from gvisor_magic.egress.policy import NetworkPolicy
from gvisor_magic.protected import PathPolicy
from gvisor_magic.request import DEFAULT_SHELL, SPEC_OPTIONS, GiB, MiB, parse_pairs

# -- parse_pairs ---------------------------------------------------------------------------


def test_pairs_strip_the_key_and_keep_the_value_as_written():
    assert parse_pairs([" A =1", "B= x ", "C=a=b", "D="], "--env") == {
        "A": "1", "B": " x ", "C": "a=b", "D": ""}
    assert parse_pairs("memory=1G", "--limit") == {"memory": "1G"}  # one str: one pair
    assert parse_pairs([], "--env") == {}


def test_a_key_given_twice_takes_its_last_value():
    assert parse_pairs(["A=1", "B=2", " A=3"], "--env") == {"A": "3", "B": "2"}


@pytest.mark.parametrize(("items", "form", "message"), [
    (["X"], "KEY=VALUE", "--opt expects KEY=VALUE, got 'X'"),
    (["A=1", "memory"], "NAME=VALUE", "--opt expects NAME=VALUE, got 'memory'"),
    (["=1"], "KEY=VALUE", "--opt expects KEY=VALUE, got '=1': the name before '=' is empty "
                          "(e.g. --opt KEY=1)"),
    ([" =1"], "NAME=VALUE", "--opt expects NAME=VALUE, got ' =1': the name before '=' is "
                            "empty (e.g. --opt NAME =1)"),
])
def test_bad_pairs_say_what_was_expected(items, form, message):
    with pytest.raises(InvalidRequestError) as caught:
        parse_pairs(items, "--opt", form=form)
    assert str(caught.value) == message


def test_pairs_of_other_types_are_type_errors():
    with pytest.raises(TypeError, match="--env expects KEY=VALUE strings, got 3"):
        parse_pairs(["A=1", 3], "--env")  # type: ignore[list-item]


# -- from_options: every setting ------------------------------------------------------------


def test_no_options_are_the_defaults():
    assert SandboxSpec.from_options({}) == SandboxSpec() == SandboxSpec.build()


def test_dirs_are_checked_and_made_real(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = str(tmp_path / "real")
    spec = SandboxSpec.from_options({"working_dir": tmp_path / "link", "repo_path": real,
                                     "kernel_dir": str(tmp_path / "link")})
    assert (spec.working_dir, spec.repo_path, spec.kernel_dir) == (real, real, real)
    for name in ("working_dir", "repo_path", "kernel_dir"):
        with pytest.raises(InvalidRequestError, match=f"{name} does not exist"):
            SandboxSpec.from_options({name: str(tmp_path / "missing")})
    with pytest.raises(TypeError, match="working_dir must be a path"):
        SandboxSpec.from_options({"working_dir": 3})


@pytest.mark.parametrize(("value", "mode"), [
    (False, "off"), ("off", "off"), (True, "public"), ("public", "public"), ("host", "host"),
    ("pypi", "allow"), ("pypi, example.com:8443", "allow"), (["github", "example.com"], "allow"),
    (NetworkPolicy.parse("npm"), "allow"),
])
def test_network_as_text_or_typed(value, mode):
    spec = SandboxSpec.from_options({"network": value})
    assert spec.network.mode == mode
    assert spec.network == NetworkPolicy.parse(value)


def test_allow_hosts_add_to_the_network_as_allow_host_does():
    hosts = ["example.com:8443", "10.0.0.1"]
    for network in (False, True, "pypi", "host"):
        spec = SandboxSpec.from_options({"network": network, "allow_hosts": hosts})
        assert spec.network == NetworkPolicy.parse(network).combined(hosts)
    assert SandboxSpec.from_options({"allow_hosts": hosts}).network.mode == "allow"
    assert SandboxSpec.from_options({"network": True, "allow_hosts": hosts}).network.mode \
        == "public"
    # As text: hosts separated by commas or blanks, as network= takes them.
    assert SandboxSpec.from_options({"allow_hosts": "example.com:8443, 10.0.0.1"}) == \
        SandboxSpec.from_options({"allow_hosts": hosts})
    # Over a base: added to its network.
    base = SandboxSpec.from_options({"network": "pypi"})
    assert SandboxSpec.from_options({"allow_hosts": hosts}, base).network == \
        NetworkPolicy.parse("pypi").combined(hosts)


def test_bad_network_settings_name_the_setting():
    with pytest.raises(InvalidRequestError, match=r"^network: 'https://x\.org/a': name a host"):
        SandboxSpec.from_options({"network": "https://x.org/a"})
    with pytest.raises(InvalidRequestError, match=r"^allow_hosts: an empty host"):
        SandboxSpec.from_options({"allow_hosts": [""]})
    with pytest.raises(TypeError, match="allow_hosts must be a list of hosts, got int"):
        SandboxSpec.from_options({"allow_hosts": 3})


def test_limits_as_a_mapping_pairs_or_typed():
    expected = Limits(memory=GiB, max_processes=64, cpus=1.5, tmp_size=16 * MiB)
    for value in ({"memory": "1G", "max_processes": "64", "cpus": "1.5", "tmp_size": "16M"},
                  {"memory": GiB, "max_processes": 64, "cpus": 1.5, "tmp_size": 16 * MiB},
                  ["memory=1G", "max_processes= 64", "cpus=1.5", "tmp_size=16M"],
                  expected):
        assert SandboxSpec.from_options({"limits": value}).limits == expected
    assert SandboxSpec.from_options({"limits": "memory=none"}).limits.memory is None


def test_limits_change_the_base_limits_they_name():
    base = SandboxSpec.from_options({"limits": {"memory": "2G", "max_open_files": 100}})
    spec = SandboxSpec.from_options({"limits": ["memory=1G"]}, base)
    assert (spec.limits.memory, spec.limits.max_open_files) == (GiB, 100)
    # A Limits replaces them all.
    assert SandboxSpec.from_options({"limits": Limits()}, base).limits == Limits()


def test_bad_limits_say_which():
    with pytest.raises(InvalidRequestError, match=r"limits\.memory: cannot read 'lots'"):
        SandboxSpec.from_options({"limits": {"memory": "lots"}})
    with pytest.raises(InvalidRequestError, match="unknown limit 'memroy'"):
        SandboxSpec.from_options({"limits": ["memroy=1G"]})
    with pytest.raises(InvalidRequestError, match=r"^limits expects NAME=VALUE, got 'memory'$"):
        SandboxSpec.from_options({"limits": ["memory"]})
    with pytest.raises(TypeError, match="limits must be a mapping"):
        SandboxSpec.from_options({"limits": 3})


def test_protected_paths_as_rules_or_typed():
    rules = ["data/raw", "-.bashrc", "+notes/"]
    spec = SandboxSpec.from_options({"protected_paths": rules})
    assert spec.protection == PathPolicy(("data/raw", "notes"), (".bashrc",))
    assert SandboxSpec.from_options({"protected_paths": spec.protection}) == spec
    with pytest.raises(TypeError, match="not one str"):
        SandboxSpec.from_options({"protected_paths": "data"})
    with pytest.raises(InvalidRequestError, match="names nothing"):
        SandboxSpec.from_options({"protected_paths": ["-"]})


def test_shell_and_python_path(tmp_path):
    spec = SandboxSpec.from_options({"shell": "/bin/bash", "python_path": [str(tmp_path)]})
    assert (spec.shell, spec.python_path) == ("/bin/bash", (str(tmp_path),))
    with pytest.raises(InvalidRequestError, match="shell must be a program name or path"):
        SandboxSpec.from_options({"shell": ""})
    with pytest.raises(TypeError, match="python_path must be a list of directories"):
        SandboxSpec.from_options({"python_path": str(tmp_path)})
    with pytest.raises(InvalidRequestError, match="python_path entry does not exist"):
        SandboxSpec.from_options({"python_path": [str(tmp_path / "missing")]})


def test_none_is_not_given_and_the_base_stands(tmp_path):
    base = SandboxSpec.from_options({"working_dir": tmp_path, "network": "pypi",
                                     "shell": "/bin/bash", "protected_paths": ["data"]})
    assert SandboxSpec.from_options(dict.fromkeys(SPEC_OPTIONS), base) == base
    changed = SandboxSpec.from_options({"network": False, "protected_paths": []}, base)
    assert changed == dataclasses.replace(base, network=NetworkPolicy(),
                                          protection=PathPolicy())


def test_unknown_settings_list_the_known_ones():
    with pytest.raises(InvalidRequestError) as caught:
        SandboxSpec.from_options({"network": True, "netwrok": True})
    assert str(caught.value) == ("unknown sandbox setting 'netwrok': expected one of "
                                 + ", ".join(SPEC_OPTIONS))
    with pytest.raises(TypeError, match="sandbox options must be a mapping"):
        SandboxSpec.from_options([("network", True)])  # type: ignore[arg-type]


def test_a_spec_made_from_a_base_has_no_plan(tmp_path):
    from gvisor_magic.protected import ProtectionPlan

    base = dataclasses.replace(SandboxSpec.build(tmp_path), plan=ProtectionPlan())
    assert SandboxSpec.from_options({}, base).plan is None


def test_build_is_from_options_with_typed_keywords(tmp_path):
    assert SandboxSpec.build(tmp_path, network="pypi", limits=Limits(memory=GiB),
                             protected_paths=["-.bashrc"], shell="/bin/bash") == \
        SandboxSpec.from_options({"working_dir": tmp_path, "network": "pypi",
                                  "limits": {"memory": "1G"}, "protected_paths": ["-.bashrc"],
                                  "shell": "/bin/bash"})
    with pytest.raises(TypeError, match=r"limits must be a gvisor_magic\.Limits"):
        SandboxSpec.build(tmp_path, limits={"memory": 1})  # type: ignore[arg-type]


# -- to_json / from_json ------------------------------------------------------------------


def every_field(tmp_path: Path) -> SandboxSpec:
    for name in ("work", "repo", "kernel", "lib"):
        (tmp_path / name).mkdir(exist_ok=True)
    return SandboxSpec.from_options({
        "working_dir": tmp_path / "work", "repo_path": tmp_path / "repo",
        "network": ["example.com", "pypi", "[::1]:8080", "*.example.org"],
        "allow_hosts": ["github", "10.0.0.1:9000"],
        "limits": {"memory": "1G", "cpus": "0.5", "max_processes": "none", "tmp_size": "64M"},
        "protected_paths": ["data/raw", "-.bashrc", "++odd", "-.ssh"],
        "shell": "/bin/bash", "kernel_dir": tmp_path / "kernel",
        "python_path": [str(tmp_path / "lib")], "hostname": "every-field",
        "writes": "review"})


def test_a_spec_with_every_field_set_round_trips(tmp_path):
    spec = every_field(tmp_path)
    assert all(getattr(spec, f.name) != f.default for f in dataclasses.fields(spec)
               if f.name != "plan" and not isinstance(f.default, dataclasses._MISSING_TYPE))
    back = SandboxSpec.from_json(spec.to_json())
    assert back == spec
    assert back.network.rules == spec.network.rules  # the order of the rules too
    assert back.network.presets == spec.network.presets == ("pypi", "github")
    assert back.protection == spec.protection
    assert SandboxSpec.from_json(back.to_json().encode()) == spec


@pytest.mark.parametrize("network", [False, True, "host", "pypi"])
@pytest.mark.parametrize("hosts", [[], ["example.com:8443"]])
def test_every_network_round_trips(network, hosts):
    spec = SandboxSpec.from_options({"network": network, "allow_hosts": hosts})
    assert SandboxSpec.from_json(spec.to_json()) == spec


def test_the_json_is_the_settings_by_their_names_without_the_plan(tmp_path):
    from gvisor_magic.protected import ProtectionPlan

    spec = dataclasses.replace(every_field(tmp_path), plan=ProtectionPlan())
    data = json.loads(spec.to_json())
    assert tuple(data) == SPEC_OPTIONS
    assert data["network"] == ["example.com", "pypi", "[::1]:8080", "*.example.org", "github",
                               "10.0.0.1:9000"]
    assert data["protected_paths"] == ["data/raw", "++odd", "-.bashrc", "-.ssh"]
    assert data["limits"]["memory"] == GiB and data["limits"]["max_processes"] is None
    public = json.loads(SandboxSpec.from_options({"network": True,
                                                  "allow_hosts": ["a.org"]}).to_json())
    assert (public["network"], public["allow_hosts"]) == (True, ["a.org"])
    assert SandboxSpec.from_json(json.dumps(data)) == spec  # the plan is host state: not kept


def test_from_json_checks_again(tmp_path):
    spec = every_field(tmp_path)
    text = spec.to_json()
    (tmp_path / "repo").rmdir()
    with pytest.raises(InvalidRequestError, match="repo_path does not exist"):
        SandboxSpec.from_json(text)
    with pytest.raises(InvalidRequestError, match="a sandbox spec must be JSON"):
        SandboxSpec.from_json("{not json")
    with pytest.raises(InvalidRequestError, match="must be a JSON object of settings, got list"):
        SandboxSpec.from_json("[]")
    with pytest.raises(InvalidRequestError, match="unknown sandbox setting 'plan'"):
        SandboxSpec.from_json('{"plan": null}')


# -- the faces end at the same spec --------------------------------------------------------

#: The same settings, as each face takes them.
HOSTNAME = "build-box"
NETWORK, HOST, LIMITS, RULES = "pypi", "example.com:8443", ["memory=1G", "max_processes=64"], \
    ["data/raw", "-.bashrc"]


class FakeShell(Configurable):
    """What ``IsolatedMagics`` reads of IPython's shell: its config and namespace."""

    user_ns: dict = {}


def magics_spec(workdir: Path, monkeypatch) -> SandboxSpec:
    """``%%isolated --workdir W --network pypi --allow-host H --limit ...`` with
    ``Isolation.protected_paths`` set: the spec the cell would run in."""
    from gvisor_magic.notebook.magics import IsolatedMagics

    config = Config({"Isolation": {"prewarm": False, "shell": DEFAULT_SHELL,
                                   "protected_paths": RULES}})
    magics = IsolatedMagics(FakeShell(config=config))
    seen = []

    def run(command, *, spec, **_):
        seen.append(spec)
        return type("Result", (), {"success": True, "returncode": 0, "stdout": "",
                                   "stderr": ""})()

    monkeypatch.setattr(magics, "run", run)
    limits = " ".join(f"--limit {item}" for item in LIMITS)
    magics.magic_isolated(f"--workdir {workdir} --network {NETWORK} --allow-host {HOST} "
                          f"{limits} --set hostname={HOSTNAME}", "true\n")
    return seen[0]


class Ran(Exception):
    """What the CLI handed to ``run_command_isolated``."""


def cli_spec(workdir: Path, monkeypatch) -> SandboxSpec:
    """``gvisor-magic run --workdir W --network pypi --allow-host H --limit ... --protect``."""
    from gvisor_magic import cli, runner

    def run_command_isolated(command, spec, **_):
        raise Ran(spec)

    monkeypatch.setattr(runner, "run_command_isolated", run_command_isolated)
    argv = ["run", "--workdir", str(workdir), "--network", NETWORK, "--allow-host", HOST]
    argv += [arg for item in LIMITS for arg in ("--limit", item)]
    argv += [f"--protect={rule}" for rule in RULES]
    argv += ["--set", f"hostname={HOSTNAME}"]
    with pytest.raises(Ran) as caught:
        cli.main([*argv, "--", "true"])
    return caught.value.args[0]


def kernel_spec(workdir: Path, tmp_path: Path, monkeypatch) -> SandboxSpec:
    """The kernelspec ``gvisor-magic kernelspec install --network pypi ...`` writes, started
    as far as the launcher's command: the spec the launcher reads (from a file of its own,
    mode 0600, beside the connection file, gone at cleanup)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from gvisor_magic import cli
    from gvisor_magic.kernel import KERNEL_NAME, launch, provisioner

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    argv = ["kernelspec", "install", "--user", "--network", NETWORK, "--allow-host", HOST]
    argv += [arg for item in LIMITS for arg in ("--limit", item)]
    argv += [f"--protect={rule}" for rule in RULES]
    argv += ["--set", f"hostname={HOSTNAME}"]
    assert cli.main(argv) == 0
    monkeypatch.setattr(provisioner, "unavailable", lambda: None)  # no runsc probe
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[str(tmp_path / "data" / "kernels")]))
    cmd, _ = km.pre_start_kernel(cwd=str(workdir))
    try:
        args = launch.parse(cmd[cmd.index("gvisor_magic.kernel.launch") + 1:])
        assert cmd[cmd.index("--spec") + 1] == args.spec
        mode = stat.S_IMODE(os.stat(args.spec).st_mode)
        assert mode == 0o600, oct(mode)
        beside = Path(km.connection_file)  # kernel-ID.json under a server
        assert Path(args.spec) == beside.with_name(f".{beside.stem}.sandbox.json")
        spec = launch.spec_of(args)
        assert spec.kernel_dir == km.provisioner.sockets_dir
    finally:
        asyncio.run(km.provisioner.cleanup(restart=False))
        km.cleanup_connection_file()
    assert not os.path.exists(args.spec), "the spec file outlived the kernel"
    return spec


def test_the_magics_the_cli_and_the_kernel_end_at_the_same_spec(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    expected = SandboxSpec.from_options({"working_dir": workdir, "network": NETWORK,
                                         "allow_hosts": [HOST], "limits": LIMITS,
                                         "protected_paths": RULES, "hostname": HOSTNAME})
    assert expected.network.mode == "allow" and expected.limits.max_processes == 64
    assert expected.hostname == HOSTNAME
    assert magics_spec(workdir, monkeypatch) == expected
    assert cli_spec(workdir, monkeypatch) == expected
    kernel = kernel_spec(workdir, tmp_path, monkeypatch)
    assert dataclasses.replace(kernel, kernel_dir=None, python_path=()) == expected


def test_a_bad_kernelspec_setting_is_refused_when_written(tmp_path):
    from gvisor_magic.kernel.kernelspec import SETTINGS, kernel_json

    with pytest.raises(InvalidRequestError, match="unknown kernel setting 'shell'"):
        kernel_json({"shell": "/bin/bash"})
    with pytest.raises(InvalidRequestError, match="not a URL"):
        kernel_json({"network": "http://x"})
    config = {"network": True, "allow_hosts": [HOST], "limits": {"memory": "2G"},
              "protected_paths": RULES, "writes": "review", "sandbox": {"hostname": HOSTNAME}}
    assert tuple(config) == SETTINGS
    assert kernel_json(config)["metadata"]["kernel_provisioner"]["config"] == config


def test_the_launcher_refuses_a_spec_it_cannot_read(tmp_path, capsys):
    from gvisor_magic.kernel import launch

    bad = tmp_path / "spec.json"
    bad.write_text('{"network": "http://x"}')
    for path in (bad, tmp_path / "missing.json"):
        assert launch.main(["--spec", str(path), "--", "true"]) == 2
        assert "bad Python 3 (gVisor) kernel settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.parse(["--sockets", str(tmp_path), "--", "true"])  # no --working-dir
    assert "give --spec FILE, or --sockets DIR and --working-dir DIR" in capsys.readouterr().err


def test_a_hand_edited_kernelspec_setting_stops_the_start(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from gvisor_magic.kernel import KERNEL_NAME, provisioner
    from gvisor_magic.kernel.kernelspec import kernel_json

    monkeypatch.setattr(provisioner, "unavailable", lambda: None)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    spec = kernel_json()
    spec["metadata"]["kernel_provisioner"]["config"] = {"limits": {"memory": "lots"}}
    (tmp_path / KERNEL_NAME).mkdir()
    (tmp_path / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
    km = KernelManager(kernel_name=KERNEL_NAME,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path)]))
    with pytest.raises(RuntimeError, match=r"bad kernel settings: limits\.memory: cannot read"):
        km.pre_start_kernel(cwd=str(tmp_path))
    assert km.provisioner.sockets_dir is None and km.provisioner.spec_file is None


@pytest.mark.parametrize("name", ["", "-lead", "trail-", "a" * 64, "dot.ted", "sp ace", "é"])
def test_a_hostname_that_is_no_host_name_is_refused(name):
    with pytest.raises(InvalidRequestError, match="is not a host name"):
        SandboxSpec.from_options({"hostname": name})


def test_settings_by_name_are_checked_on_every_face(tmp_path, capsys):
    from gvisor_magic import cli
    from gvisor_magic.kernel.kernelspec import kernel_json
    from gvisor_magic.notebook.magics import Isolation

    assert SandboxSpec.from_options({"hostname": "a-1"}).hostname == "a-1"
    assert cli.main(["run", "--set", "hostnme=x", "--", "true"]) == 2
    assert "--set: unknown sandbox setting 'hostnme'" in capsys.readouterr().err
    assert cli.main(["run", "--set", "hostname=-x", "--", "true"]) == 2
    assert "is not a host name" in capsys.readouterr().err
    with pytest.raises(InvalidRequestError, match="unknown sandbox setting 'working_dir'"):
        kernel_json({"sandbox": {"working_dir": str(tmp_path)}})
    with pytest.raises(TraitError, match=r"Isolation\.sandbox: .*is not a host name"):
        Isolation(sandbox={"hostname": "x_y"})
    assert Isolation(sandbox={"hostname": "nb"}).spec().hostname == "nb"
