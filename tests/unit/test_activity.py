"""Which changes a host tool would run later (active, held) and which are inert (applied).

Pure and sandbox-free: ``classify`` judges paths under a temporary working dir against an
injected ``HostContext``. The ``fires on the host`` tests plant a member of a class in a
temporary dir, run the real host tool (python, git, bash, pytest, pdb) and check its
side effect (a marker file), then check that ``classify`` holds it; their inert
counterparts (a ``.pth`` outside a site dir, a ``.bashrc`` outside the home) are shown
not to fire. Imports are done inside each test, so a missing name fails that test, not
the collection.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DIR = stat.S_IFDIR | 0o755
EXE = stat.S_IFREG | 0o755
FRESH_GIT_CONFIG = (b"[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
                    b"\tlogallrefupdates = true\n[remote \"origin\"]\n\turl = https://github.com/"
                    b"o/r.git\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n[branch \"main\"]\n"
                    b"\tremote = origin\n\tmerge = refs/heads/main\n")


class World:
    """A working dir, a home, a site dir and a PATH dir, and the host context over them."""

    def __init__(self, root: Path, *, wd_is_home: bool = False):
        from gvisor_magic.activity import HostContext

        self.root = root
        self.home = root / "home"
        self.wd = self.home if wd_is_home else root / "work"
        self.site = root / "site"
        self.bin = root / "bin"
        for d in (self.home, self.wd, self.site, self.bin):
            d.mkdir(parents=True, exist_ok=True)
        (self.site / "requests").mkdir()
        (self.site / "numpy.py").write_text("")
        (self.site / "google").mkdir()  # a namespace package, as protobuf installs it
        self.host = HostContext.build(sys_path=[str(self.site)], site_dirs=[str(self.site)],
                                      path=str(self.bin), home=str(self.home),
                                      environ={"PYTHONSTARTUP": str(self.home / "startup.py")})
        #: Paths that exist after the change (beyond the real filesystem).
        self.present: set[str] = set()

    def exists(self, path: str) -> bool:
        return path in self.present or os.path.lexists(path)

    def judge(self, rel: str, content=b"", *, base: Path | None = None, **kwargs):
        from gvisor_magic.activity import classify

        path = os.path.join(base or self.wd, rel)
        return classify(path, working_dir=str(self.wd), content=content, host=self.host,
                        exists=self.exists, **kwargs)


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def held(verdict, klass: str) -> bool:
    return verdict.active and verdict.klass == klass and bool(verdict.reason)


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
    env.update(extra)
    return env


# -- bytecode --------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", [
    "__pycache__/mod.cpython-311.pyc", "mod.pyc", "legacy.pyo",
    "pkg/__pycache__/a.cpython-310.opt-1.pyc", "deep/x/__pycache__/b.pypy39.pyc",
    "__pycache__/notes.txt",
])
def test_bytecode_is_never_applied(world, rel):
    assert held(world.judge(rel), "bytecode")


def test_a_pycache_dir_is_bytecode_and_lookalikes_are_not(world):
    assert held(world.judge("pkg/__pycache__", mode=DIR), "bytecode")
    assert not world.judge("data/mod.pyc.txt").active
    assert not world.judge("data/report.pdf").active


# -- start-up hooks --------------------------------------------------------------------------


def test_pth_runs_only_in_a_site_dir(world):
    assert held(world.judge("evil.pth", base=world.site), "startup-hook")
    assert held(world.judge("venv/lib/python3.11/site-packages/_x.pth"), "startup-hook")
    assert held(world.judge("env/lib/python3/dist-packages/y.pth"), "startup-hook")
    assert not world.judge("evil.pth").active  # the working dir is no site dir
    assert not world.judge("data/paths.pth").active


@pytest.mark.parametrize("rel", ["sitecustomize.py", "lib/usercustomize.py",
                                 "x/sitecustomize.cpython-311-x86_64-linux-gnu.so",
                                 "venv/pyvenv.cfg", ".envrc", "sub/.envrc"])
def test_interpreter_start_up_files(world, rel):
    assert held(world.judge(rel), "startup-hook")


def test_virtual_environment_scripts_and_links(world):
    for rel in ("venv/bin/activate", "venv/bin/activate.fish", "venv/Scripts/Activate.ps1",
                "venv/Scripts/activate.bat", "env/etc/conda/activate.d/env_vars.sh"):
        assert held(world.judge(rel), "startup-hook"), rel
    world.present.add(str(world.wd / "venv" / "pyvenv.cfg"))
    assert held(world.judge("venv/bin/python3", mode=EXE), "startup-hook")
    assert held(world.judge("venv/bin/pip", mode=EXE), "startup-hook")
    # A project's bin/ without pyvenv.cfg is just scripts the user runs by name.
    assert not world.judge("tools/bin/run.sh", mode=EXE).active


def test_home_start_up_files_but_not_lookalikes_elsewhere(world):
    for rel in (".bashrc", ".profile", ".zshenv", ".config/fish/config.fish",
                ".ipython/profile_default/startup/00.py", ".local/share/jupyter/kernels/k/k.json",
                ".ssh/authorized_keys", ".aws/config", ".pythonrc.py", "startup.py"):
        verdict = world.judge(rel, base=world.home)
        assert verdict.active, rel
    assert held(world.judge(".bashrc", base=world.home), "startup-hook")
    assert held(world.judge("startup.py", base=world.home), "startup-hook")  # PYTHONSTARTUP
    assert not world.judge(".bashrc").active  # a project's .bashrc: bash reads only $HOME's
    assert not world.judge("proj/.profile").active


def test_dotenv_is_judged_by_what_it_sets(world):
    assert held(world.judge(".env", b"LD_PRELOAD=/tmp/x.so\n"), "startup-hook")
    assert held(world.judge("app/.env.local", b"export PYTHONPATH=/tmp\n"), "startup-hook")
    assert held(world.judge(".env", b"NODE_OPTIONS=--require ./x.js\n"), "startup-hook")
    assert not world.judge(".env", b"# db\nDATABASE_URL=postgres://db/x\nDEBUG=1\n").active
    assert not world.judge(".env.example", b"LD_PRELOAD=\n").active


# -- executable on PATH ----------------------------------------------------------------------


def test_anything_in_a_path_dir(world):
    assert held(world.judge("ls", mode=EXE, base=world.bin), "executable-on-path")
    assert held(world.judge("README", base=world.bin), "executable-on-path")
    assert held(world.judge(".local/bin/jupyter", mode=EXE, base=world.home),
                "executable-on-path")
    assert held(world.judge("bin/git", mode=EXE, base=world.home), "executable-on-path")


def test_scripts_outside_path_and_node_bins_are_inert(world):
    assert not world.judge("scripts/run.sh", mode=EXE).active
    # On PATH only under `npm run`, which runs what package.json names: the user's command.
    assert not world.judge("node_modules/.bin/jest", mode=EXE).active
    assert not world.judge("node_modules/left-pad/index.js").active
    assert not world.judge("node_modules/left-pad/package.json").active


# -- importable ------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", [
    "numpy.py", "mymod.py", "fast.cpython-311-x86_64-linux-gnu.so", "fast2.abi3.so",
    "old.cpython-310-x86_64-linux-gnu.so", "pkg/__init__.py", "google/protobuf/__init__.py",
    "notebooks/json.py", "analysis/requests/__init__.py",
])
def test_importable_modules(world, rel):
    assert held(world.judge(rel), "importable")


def test_packages_and_their_modules(world):
    world.present.add(str(world.wd / "pkg" / "__init__.py"))
    assert held(world.judge("pkg", mode=DIR), "importable")
    assert held(world.judge("pkg/sub/mod.py"), "importable")
    assert held(world.judge("requests", mode=DIR), "importable")  # joins an installed name
    assert held(world.judge("anything.json", base=world.site / "requests"), "importable")


def test_not_importable(world):
    for rel in ("data.csv", "novelns/helper.py", "my-repo/src/x.py", "build/foo.o",
                "build/libfoo.so.1", "wheels/pkg-1.0-py3-none-any.whl", "repo/README.md",
                "tests/test_x.py", "proj/setup.py", "proj/noxfile.py", "proj/Makefile",
                "my.data.py", "dist/pkg-1.0.tar.gz"):
        assert not world.judge(rel).active, rel
    assert not world.judge("novelns", mode=DIR).active  # a namespace dir runs nothing


# -- code a tool runs by convention ----------------------------------------------------------


@pytest.mark.parametrize("rel", [
    "proj/conftest.py", "proj/tests/unit/conftest.py", ".pdbrc", "proj/.Rprofile",
    "proj/ipython_config.py", "ipy/profile_default/startup/00-x.ipy",
    "proj/jupyter_server_config.py", "proj/eslint.config.js", "web/.eslintrc.cjs",
    "proj/.dir-locals.el", "venv/share/jupyter/kernels/evil/kernel.json",
    "node_modules/.hooks/preinstall", "proj/.gdbinit", "proj/.exrc",
])
def test_tool_code(world, rel):
    assert held(world.judge(rel), "tool-code")


def test_tool_code_lookalikes(world):
    assert not world.judge("data/kernel.json").active
    assert not world.judge("web/.eslintrc.json", b'{"rules": {"semi": "error"}}').active
    assert world.judge("web/.eslintrc.json", b'{"plugins": ["x"]}').active
    assert not world.judge("proj/.editorconfig", b"root = true\n").active


# -- configuration judged by content ---------------------------------------------------------


@pytest.mark.parametrize(("rel", "text", "active"), [
    ("venv/pip.conf", b"[global]\nindex-url = https://evil.example/simple\n", True),
    (".config/pip/pip.conf", b"[install]\nfind-links = /tmp/w\n", True),
    ("venv/pip.conf", b"[global]\ntimeout = 60\ndisable-pip-version-check = true\n", False),
    ("web/.npmrc", b"script-shell=/tmp/sh\n", True),
    ("web/.npmrc", b"node-options=--require /tmp/x.js\n", True),
    ("web/.npmrc", b"@acme:registry=https://evil.example/\n", True),
    ("web/.npmrc", b"ignore-scripts=false\n", True),
    ("web/.npmrc", b"save-exact=true\nfund=false\nignore-scripts=true\n", False),
    ("web/.yarnrc", b'yarn-path "./evil.js"\n', True),
    ("matplotlibrc", b"backend: module://evil_backend\n", True),
    ("proj/matplotlibrc", b"text.latex.preamble: \\\\input{/etc/x}\n", True),
    ("matplotlibrc", b"backend: Agg\nfigure.dpi: 120  # print\nfont.size: 9\n", False),
    ("proj/pytest.ini", b"[pytest]\naddopts = -p evil_plugin\n", True),
    ("proj/pytest.ini", b"[pytest]\naddopts = -ra --strict-markers\ntestpaths = tests\n", False),
    ("proj/setup.cfg", b"[mypy]\nplugins = evil.plugin\n", True),
    ("proj/setup.cfg", b"[metadata]\nname = x\n[tool:pytest]\naddopts = -q\n", False),
    ("proj/tox.ini", b"[tox]\nenvlist = py311\n[testenv]\ncommands = pytest\n", False),
    ("proj/.pylintrc", b"[MAIN]\ninit-hook = import os; os.system('x')\n", True),
    ("proj/.coveragerc", b"[run]\nplugins = evil\n", True),
    ("proj/pyproject.toml", b"[tool.pytest.ini_options]\naddopts = \"-p evil\"\n", True),
    ("proj/pyproject.toml", b"[tool.pytest.ini_options]\npythonpath = [\"/tmp/x\"]\n", True),
    ("proj/pyproject.toml", b"[tool.mypy]\nplugins = [\"pydantic.mypy\"]\n", True),
    ("proj/pyproject.toml", b"[build-system]\nrequires = [\"hatchling\"]\n"
                            b"[tool.ruff]\nline-length = 100\n", False),
    ("proj/.vscode/settings.json", b'{"python.defaultInterpreterPath": "/tmp/py"}', True),
    ("proj/.vscode/settings.json", b'{"terminal.integrated.env.linux": {"X": "1"}}', True),
    ("proj/.vscode/settings.json", b'{"editor.fontSize": 13, "files.trimTrailingWhitespace": true}',
     False),
    ("proj/.vscode/settings.json", b'{\n // comments: JSONC is not parsed\n "a": 1}', True),
    ("proj/.vscode/tasks.json", b'{"tasks": [{"label": "x", "command": "make",'
                                b' "runOptions": {"runOn": "folderOpen"}}]}', True),
    ("proj/.vscode/tasks.json", b'{"tasks": [{"label": "x", "command": "make"}]}', False),
    ("proj/.cargo/config.toml", b"[target.x86_64-unknown-linux-gnu]\nrunner = \"/tmp/x\"\n", True),
    ("proj/.cargo/config.toml", b"[term]\ncolor = \"auto\"\n", False),
    ("proj/.python-version", b"3.11.7\n", False),
    ("proj/.python-version", b"../../../tmp/evil\n", True),
    ("proj/.tool-versions", b"python 3.11.7\nnodejs 20.1.0\n", False),
    ("proj/.tool-versions", b"python path:/tmp/py\n", True),
    ("web/.nvmrc", b"lts/*\n", False),
    ("proj/pytest.toml", b"[pytest]\naddopts = [\"-p\", \"evil\"]\n", True),
    ("proj/pytest.toml", b"[pytest]\naddopts = [\"-ra\"]\n", False),
    ("proj/pyproject.toml", b"[tool.pytest]\naddopts = [\"--pdbcls=evil:Pdb\"]\n", True),
])
def test_configuration_by_content(world, rel, text, active):
    verdict = world.judge(rel, text)
    assert verdict.active is active, (rel, text, verdict)
    if active:
        assert verdict.klass == "tool-config" and verdict.reason


def test_this_projects_own_pyproject_is_inert(world):
    verdict = world.judge("proj/pyproject.toml", (REPO / "pyproject.toml").read_bytes())
    assert not verdict.active, verdict


@pytest.mark.parametrize("rel", [".idea/workspace.xml", "proj/.devcontainer/devcontainer.json",
                                 "proj/.yarnrc.yml", "proj/.condarc", "proj/bunfig.toml",
                                 "proj/mise.toml"])
def test_configuration_held_whole(world, rel):
    assert world.judge(rel, b"x: 1\n").active


def test_unreadable_configuration_is_held(world):
    from gvisor_magic.activity import MAX_CONFIG_BYTES

    big = b"[tool.ruff]\n" + b"# pad\n" * (MAX_CONFIG_BYTES // 6 + 1)
    assert world.judge("proj/pyproject.toml", big).active
    assert world.judge("venv/pip.conf", b"\x00\x01binary").active
    assert world.judge("web/.npmrc", b"\xff\xfe not utf-8").active
    assert world.judge("web/.npmrc", None).active
    assert world.judge("proj/pytest.ini", b"not [an ini").active


def test_content_is_read_lazily_and_only_when_needed(world):
    def boom() -> bytes:
        raise AssertionError("read")

    assert not world.judge("data/big.csv", boom).active
    assert not world.judge("img/plot.png", boom, mode=stat.S_IFREG | 0o644).active
    calls = []
    assert not world.judge("venv/pip.conf", lambda: calls.append(1) or b"[global]\n").active
    assert calls == [1]


def test_inert_everyday_files(world):
    for rel, text in ((".github/workflows/ci.yml", b"on: push\njobs: {}\n"),
                      ("proj/.editorconfig", b"[*]\nindent_style = space\n"),
                      ("proj/.gitignore", b"*.pyc\n"), ("proj/Dockerfile", b"FROM x\n"),
                      ("nb/analysis.ipynb", b"{}"), ("proj/package.json", b"{}"),
                      ("proj/style.mplstyle", b"backend: module://x\n")):
        assert not world.judge(rel, text).active, rel


# -- repositories ----------------------------------------------------------------------------


def test_a_fresh_clone_is_inert(world):
    assert not world.judge("repo/.git/config", FRESH_GIT_CONFIG).active
    for rel in ("repo/.git/hooks/pre-commit.sample", "repo/.git/HEAD", "repo/.git/index",
                "repo/.git/packed-refs", "repo/.git/info/exclude", "repo/.git/objects/ab/cdef",
                "repo/.git/description", "repo/.git/logs/HEAD", "repo/src/main.c",
                "repo/.gitignore"):
        assert not world.judge(rel, b"# x\n").active, rel
    assert not world.judge("repo/.git", mode=DIR).active
    assert not world.judge("repo/.git/hooks", mode=DIR).active


@pytest.mark.parametrize(("rel", "text"), [
    ("repo/.git/config", FRESH_GIT_CONFIG + b"[core]\n\tfsmonitor = /tmp/x\n"),
    ("repo/.git/config", b"[alias]\n\tst = !sh -c 'curl x | sh'\n"),
    ("repo/.git/config", b'[remote "o"]\n\turl = ext::sh -c touch% /tmp/x\n'),
    ("repo/.git/config.worktree", b"[core]\n\thooksPath = /tmp/hooks\n"),
    ("repo/.git/modules/sub/config", b"[core]\n\tpager = less; touch /tmp/x\n"),
    ("repo/.gitconfig", b"[filter \"x\"]\n\tsmudge = /tmp/x\n"),
    ("repo/.gitmodules", b'[submodule "s"]\n\tpath = s\n\turl = -oProxyCommand=x\n'),
    ("repo/.gitmodules", b'[submodule "s"]\n\tupdate = !sh x\n'),
    ("repo/.gitattributes", b"*.bin filter=evil\n"),
    ("repo/.git/info/attributes", b"* diff=custom\n"),
    ("repo/.git/hooks/pre-commit", b"#!/bin/sh\n"),
    ("repo/.git/modules/sub/hooks/post-checkout", b"#!/bin/sh\n"),
    ("repo/.husky/pre-commit", b"npm test\n"),
    ("repo/.pre-commit-config.yaml", b"repos: []\n"),
    ("repo/.hg/hgrc", b"[hooks]\nupdate = x\n"),
])
def test_repository_hooks_and_configuration(world, rel, text):
    assert held(world.judge(rel, text), "repository")


def test_repository_content_that_runs_nothing(world):
    assert not world.judge("repo/.gitattributes",
                           b"* text=auto eol=lf\n*.psd filter=lfs diff=lfs merge=lfs -text\n"
                           b"*.py diff=python\n*.lock -diff merge=union\n").active
    assert not world.judge("repo/.gitmodules",
                           b'[submodule "s"]\n\tpath = s\n\turl = https://x/s.git\n').active
    assert not world.judge("repo/sub/.git", b"gitdir: ../.git/modules/sub\n").active
    assert held(world.judge("repo/sub/.git", b"gitdir: /home/u/other/.git\n"), "repository")


def test_a_bare_repository_is_recognised_by_its_layout(world):
    for entry in ("HEAD", "objects"):
        world.present.add(str(world.wd / "mirror.git" / entry))
    assert held(world.judge("mirror.git/config", b"[core]\n\tfsmonitor = x\n"), "repository")
    assert held(world.judge("mirror.git/hooks/post-receive"), "repository")
    assert not world.judge("mirror.git/hooks/update.sample").active
    assert not world.judge("project/hooks/deploy.py").active  # a worktree's own hooks/ dir


# -- symlinks and deletions ------------------------------------------------------------------


def test_symlinks(world):
    bashrc = str(world.home / ".bashrc")
    assert held(world.judge("out.log", None, is_symlink=True, link_target=bashrc), "symlink-out")
    assert held(world.judge("a/b", None, is_symlink=True, link_target="../../../etc"),
                "symlink-out")
    assert not world.judge("latest", None, is_symlink=True, link_target="runs/42").active
    # A link's content is not judged: a config that is a link is held.
    assert world.judge("web/.npmrc", b"save-exact=true\n", is_symlink=True,
                       link_target="npmrc.txt").active


def test_deletions(world):
    for rel in ("repo/.git/hooks/pre-commit", "x.pyc", "sitecustomize.py", "numpy.py",
                "repo/.git/config", ".bashrc", "data.csv"):
        assert not world.judge(rel, None, deleted=True).active, rel
    for rel in ("web/.npmrc", "venv/pip.conf", "proj/.yarnrc.yml"):
        assert held(world.judge(rel, None, deleted=True), "tool-config"), rel


def test_working_dir_as_home(tmp_path):
    world = World(tmp_path, wd_is_home=True)
    assert held(world.judge(".bashrc", b"x"), "startup-hook")
    assert held(world.judge(".local/bin/x", mode=EXE), "executable-on-path")
    assert not world.judge("notes/todo.txt").active
    assert not world.judge(".gitconfig", b"[user]\n\tname = A\n").active
    assert world.judge(".gitconfig", b"[core]\n\tsshCommand = x\n").active


def test_host_context(tmp_path):
    from gvisor_magic.activity import HostContext

    assert HostContext.current() is HostContext.current()
    (tmp_path / "alpha.py").write_text("")
    (tmp_path / "beta").mkdir()
    (tmp_path / "gamma.abi3.so").write_text("")
    (tmp_path / "x-1.0.dist-info").mkdir()
    host = HostContext.build(sys_path=[str(tmp_path)], path="/usr/bin:relative", home="/h")
    assert {"alpha", "beta", "gamma", "json"} <= host.importable
    assert "x-1" not in host.importable and "x-1.0.dist-info" not in host.importable
    assert host.path_dirs == frozenset({"/usr/bin"})


# -- members that fire on the host -----------------------------------------------------------


def test_fires_module_in_the_kernel_dir(world):
    marker = world.root / "imported"
    (world.wd / "planted_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    subprocess.run([sys.executable, "-c", "import planted_mod"], cwd=world.wd, check=True,
                   env=env_for(world.home), timeout=30)
    assert marker.exists()
    assert held(world.judge("planted_mod.py"), "importable")


def test_fires_pth_in_a_site_dir_only(world):
    base = getattr(sys, "_base_executable", sys.executable)  # a venv's Python has no user site
    userbase = world.root / "userbase"
    site = userbase / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True)
    plain = world.wd / "lib"  # on PYTHONPATH below, but no site dir
    plain.mkdir()
    fired, not_fired = world.root / "pth-site", world.root / "pth-plain"
    (site / "planted.pth").write_text(f"import os; open({str(fired)!r}, 'w').close()\n")
    (plain / "planted.pth").write_text(f"import os; open({str(not_fired)!r}, 'w').close()\n")
    subprocess.run([base, "-c", "pass"], check=True, timeout=30, env=env_for(
        world.home, PYTHONUSERBASE=str(userbase), PYTHONPATH=str(plain)))
    assert fired.exists() and not not_fired.exists()
    from gvisor_magic.activity import HostContext, classify

    host = HostContext.build(sys_path=[str(site)], site_dirs=[str(site)])
    common = {"working_dir": str(world.wd), "content": b"", "host": host}
    assert held(classify(str(site / "planted.pth"), **common), "startup-hook")
    assert not classify(str(plain / "planted.pth"), **common).active


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_fires_git_fsmonitor_and_hook_but_not_a_fresh_repo(world):
    env = env_for(world.home, GIT_CONFIG_GLOBAL=os.devnull)
    repo = world.wd / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env, timeout=30)
    dot_git = repo / ".git"
    # What `git init` wrote: its config and sample hooks are inert.
    assert not world.judge("repo/.git/config", (dot_git / "config").read_bytes()).active
    samples = sorted(dot_git.joinpath("hooks").iterdir())
    assert samples and all(not world.judge(str(p), p.read_bytes()).active for p in samples)

    fsmonitor = world.root / "fsmonitor-ran"
    subprocess.run(["git", "config", "core.fsmonitor", f"touch {fsmonitor}; true"], cwd=repo,
                   check=True, env=env, timeout=30)
    subprocess.run(["git", "status", "--short"], cwd=repo, env=env, timeout=30,
                   capture_output=True)
    assert fsmonitor.exists()
    assert held(world.judge("repo/.git/config", (dot_git / "config").read_bytes()), "repository")

    subprocess.run(["git", "config", "--unset", "core.fsmonitor"], cwd=repo, check=True, env=env)
    hook_ran = world.root / "hook-ran"
    hook = dot_git / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\ntouch {hook_ran}\n")
    hook.chmod(0o755)
    subprocess.run(["git", "-c", "user.name=a", "-c", "user.email=a@b", "commit", "-q",
                    "--allow-empty", "-m", "x"], cwd=repo, check=True, env=env, timeout=30)
    assert hook_ran.exists()
    assert held(world.judge("repo/.git/hooks/pre-commit", hook.read_bytes(), mode=EXE),
                "repository")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_fires_bashrc_in_the_home_only(world):
    in_home, in_project = world.root / "home-rc", world.root / "project-rc"
    (world.home / ".bashrc").write_text(f"touch {in_home}\n")
    (world.wd / ".bashrc").write_text(f"touch {in_project}\n")
    subprocess.run(["bash", "-ic", "true"], cwd=world.wd, env=env_for(world.home), timeout=30,
                   stdin=subprocess.DEVNULL, capture_output=True)
    assert in_home.exists() and not in_project.exists()
    assert held(world.judge(".bashrc", base=world.home), "startup-hook")
    assert not world.judge(".bashrc").active


def test_fires_conftest_for_a_test_named_on_the_command_line(world):
    pytest_ini = b"[pytest]\naddopts = -q\n"
    marker = world.root / "conftest-ran"
    proj = world.wd / "proj"
    proj.mkdir()
    (proj / "pytest.ini").write_bytes(pytest_ini)
    (proj / "conftest.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (proj / "test_one.py").write_text("def test_one():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          "test_one.py"], cwd=proj, timeout=60,
                         env=env_for(world.home, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"),
                         capture_output=True)
    assert run.returncode == 0, run.stdout.decode()[-2000:]
    assert marker.exists()
    assert held(world.judge("proj/conftest.py"), "tool-code")
    assert not world.judge("proj/pytest.ini", pytest_ini).active
    assert not world.judge("proj/test_one.py").active  # named by the user


def test_fires_pdbrc_in_the_current_dir(world):
    marker = world.root / "pdbrc-ran"
    (world.wd / "script.py").write_text("x = 1\n")
    (world.wd / ".pdbrc").write_text(f"!open({str(marker)!r}, 'w').close()\n")
    subprocess.run([sys.executable, "-m", "pdb", "script.py"], cwd=world.wd, timeout=30,
                   env=env_for(world.home), stdin=subprocess.DEVNULL, capture_output=True)
    assert marker.exists()
    assert held(world.judge(".pdbrc"), "tool-code")
