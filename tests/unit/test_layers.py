"""The package's layers, read from its own imports: no import runs back up, the runner core
never imports IPython, and code that runs inside a sandbox (or as a bare helper process)
uses the standard library only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gvisor_magic"
#: Lowest first: a module may import only from its own layer or lower ones.
LAYERS = [
    {"sandboxed", "backends.reaper"},  # stdlib only, run as programs
    {"install", "_version"},  # stdlib only: runs before the dependencies are installed
    {"registry", "errors", "result", "detect", "interrupts", "process", "setid", "stand_ins",
     "memory", "egress", "protected", "request", "postrun", "agent_channel", "run_dirs",
     "activity", "changes", "writes"},
    {"backends"},
    {"warm"},
    {"runner"},
    {"session"},
    {"aio"},
    {"notebook", "kernel", "mcp_server"},
    {"cli", "__init__"},
]
NOTEBOOK_ONLY = {"IPython", "ipywidgets", "traitlets", "ipykernel", "jupyter_client"}
#: The packages that may import IPython and Jupyter: the extension and the gVisor kernel.
NOTEBOOK_LAYER = ("notebook", "kernel")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts) if parts != ("__init__",) else "__init__"


def resolve(name: str) -> str:
    """The module a name imported from this package lives in (``x.y``, ``__init__``)."""
    parts = name.split(".")
    while parts:
        path = PACKAGE.joinpath(*parts)
        if path.with_suffix(".py").exists() or path.is_dir():
            return ".".join(parts)
        parts.pop()  # a name defined in a module, not a module
    return "__init__"


def layer_of(name: str) -> int:
    for index, members in enumerate(LAYERS):
        if name in members or name.split(".")[0] in members:
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether it is this package's), for every import in the file."""
    found = []
    package = module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, alias.name.startswith("gvisor_magic")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
                names = [target] if node.module else [f"{target}.{a.name}".lstrip(".")
                                                       for a in node.names]
                found += [(name.lstrip("."), True) for name in names]
            else:
                found.append((node.module, node.module.startswith("gvisor_magic")))
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_import_runs_back_up():
    wrong = []
    for path in modules():
        me = module_name(path)
        if me == "backends.__init__":
            continue
        for target, ours in imports(path):
            if ours:
                target = resolve(target.removeprefix("gvisor_magic").lstrip("."))
                if layer_of(target) > layer_of(me):
                    wrong.append(f"{me} -> {target}")
    assert wrong == []


def test_only_the_notebook_layer_imports_ipython():
    wrong = [f"{module_name(p)} -> {t}" for p in modules() for t, ours in imports(p)
             if not ours and t.split(".")[0] in NOTEBOOK_ONLY
             and module_name(p).split(".")[0] not in (*NOTEBOOK_LAYER, "__init__")]
    assert wrong == []


def test_what_runs_inside_a_sandbox_is_stdlib_only():
    programs = [*(PACKAGE / "sandboxed").glob("*.py"), PACKAGE / "backends" / "reaper.py"]
    assert len(programs) >= 4
    for path in programs:
        name = module_name(path)
        outside = [t for t, ours in imports(path)
                   if ours or t.split(".")[0] not in sys.stdlib_module_names]
        assert outside == [], (name, outside)


def test_the_installer_is_stdlib_only_and_self_contained():
    """``python -m gvisor_magic.install`` runs where no dependency is installed yet."""
    files = sorted((PACKAGE / "install").glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "__main__.py", "runsc.py",
                                       "docker_runtime.py"}
    for path in [*files, PACKAGE / "_version.py"]:
        outside = [t for t, ours in imports(path)
                   if (ours and not t.lstrip(".").startswith("install"))
                   or (not ours and t.split(".")[0] not in sys.stdlib_module_names)]
        assert outside == [], (module_name(path), outside)
