"""Which of a command's changes a host tool would run or load later: active or inert.

A command's writes can be held back and applied after it ends; each changed path is
then judged here. **Inert** changes (a CSV, a downloaded wheel, a cloned repository's
files, object files) are applied at once. **Active** ones are held for the user to
review: a change is active when a host tool would run or load it later *without the
user naming that file* (``python`` imports a module in its directory, git runs a hook,
pytest imports every ``conftest.py`` above the test it was asked to run). Whatever is
named when it runs (``make`` and its ``Makefile``, ``setup.py`` under ``pip install .``,
``npm run`` and ``package.json`` scripts, a test file passed to pytest) is inert.

Any list of names trails the next tool, so the rules go by class and effect, and where a
file's content can be read safely (small, text, a format the standard library parses)
by what it says: a fresh clone's ``.git/config`` and its ``*.sample`` hooks are inert, a
config with ``core.fsmonitor`` is not. Where it cannot be read, an active-looking file is
held. ``classify`` is pure: it reads nothing but the content it is given, the
``HostContext`` and, through ``exists``, whether a sibling exists after the change.

The classes (``Verdict.klass``):

- ``bytecode``: ``*.pyc``, ``*.pyo``, anything under ``__pycache__``. Never applied; the
  host compiles its own (a cached file Python finds first runs instead of the source).
- ``startup-hook``: what runs when a program starts. ``.pth`` files in a site dir
  (``site`` runs their ``import`` lines; a ``.pth`` on ``PYTHONPATH`` or in a plain
  directory is never read: checked 2026-12-07, Python 3.11.7), ``sitecustomize``,
  ``usercustomize``, ``pyvenv.cfg``, a virtual environment's ``bin/``/``Scripts/``
  (activation scripts, interpreter links, every program there is on PATH once it is
  activated), conda's ``etc/conda/activate.d``, the home's shell start-up files and the
  other entries of ``protected.HOME_PROTECTED`` (bash 5.2 ``-i`` read ``$HOME/.bashrc``,
  never the cwd's: checked 2026-12-07), the files named by the host's
  ``PYTHONSTARTUP``/``BASH_ENV``/``ENV``, ``.envrc`` (direnv, on entering the
  directory), ``.env`` files that set a variable which makes a program load code
  (``LD_PRELOAD``, ``PYTHONPATH``, ``NODE_OPTIONS``...: python-dotenv, direnv's
  ``dotenv``, pipenv and docker compose read them).
- ``executable-on-path``: anything written into a directory on the host's PATH, or
  into ``~/.local/bin`` and ``~/bin`` (Debian's ``.profile`` adds them when they exist).
- ``importable``: anything in a host import dir other than the working dir
  (site-packages, the user site: modules, data, a distribution's entry points); in the
  working dir (a kernel's import path: IPython puts its directory first) a module
  (``*.py``, an extension module) or a regular package at the top, and what is below a
  top-level package that is regular or whose name the host imports (a namespace
  portion of an installed name joins it: ``google/``). Anywhere below the working dir, a
  module or package that shadows a name the host imports (Jupyter starts a notebook's
  kernel in the notebook's directory). A new namespace directory with a novel name is
  inert: importing it runs nothing, and its modules run only when named.
- ``repository``: git hooks (``hooks/*`` of a git dir, except ``*.sample``), a git
  config (``.git/config``, ``config.worktree``, a bare repository's, ``.gitmodules``, a
  ``.gitconfig`` anywhere: projects ``include.path`` one) with a key that runs a program
  (``postrun.git_config_runs_programs``, from git-config(1)), ``.gitattributes`` and
  ``info/attributes`` that select a filter, diff or merge driver (``lfs`` and git's
  builtins excepted: the driver is a program the user's configuration names), a ``.git``
  file that points outside the working dir, Mercurial's ``.hg/hgrc``, and what makes
  ``git commit`` run something on its own: ``.pre-commit-config.yaml``, ``.husky/``,
  lefthook. (git 2.39.5 ran a planted ``core.fsmonitor`` on ``git status`` and a
  ``pre-commit`` hook on ``git commit``, and ``git init``'s own config and hooks are all
  inert here: checked 2026-12-07.)
- ``tool-config``: configuration a host tool reads by convention from the working dir, a
  parent, the home or an environment's prefix, and that can name a program or module to
  run: pip (``pip.conf``: an index is code at the next install; pip 23.2 read
  ``<venv>/pip.conf``, ``~/.pip/pip.conf`` and ``~/.config/pip/pip.conf``: ``pip config
  debug``, 2026-12-07), npm and yarn (``.npmrc``: ``script-shell``, ``node-options``,
  ``registry``; ``.yarnrc``: ``yarn-path``), matplotlib (``./matplotlibrc`` first:
  ``backend: module://...`` imports a module, ``*.preamble`` runs TeX), pytest, coverage,
  mypy and pylint settings in ``pytest.ini``, ``tox.ini``, ``setup.cfg``,
  ``pyproject.toml`` (``addopts``, ``pythonpath``, ``plugins``, ``init-hook``), VS Code
  (``settings.json`` keys that name an interpreter, a path, a command or an environment;
  ``tasks.json`` with ``runOn: folderOpen``), cargo (``runner``, ``rustc-wrapper``,
  ``[alias]``), version files (``.python-version`` and friends select an interpreter:
  a path or ``..`` there is held), and files with no parser here that are held whole
  (``.idea/``, ``.devcontainer``, ``.yarnrc.yml``, ``.condarc``, ``bunfig.toml``, mise).
- ``tool-code``: code a tool runs or imports by convention: ``conftest.py`` (pytest
  imports it even for a test named on the command line: checked 2026-12-07, pytest 9.2),
  ``.pdbrc`` (pdb runs ``./.pdbrc``: checked 2026-12-07, Python 3.11.7), IPython and
  Jupyter config and start-up files (``ipython_*config.py``, ``profile_*/startup/``,
  ``jupyter_*_config.py``, kernelspecs; held wherever they are: IPython 9.19 no longer
  reads them from the cwd, but ``IPYTHONDIR`` and ``JUPYTER_CONFIG_DIR`` can point into
  the working dir, and an environment's ``etc/jupyter`` is read by its own server),
  ``.Rprofile``/``.Renviron``, ``.irbrc``, ``.pryrc``, ``.gdbinit``, ``.lldbinit``,
  vim's ``.exrc``/``.nvimrc``/``.nvim.lua``, Emacs' ``.dir-locals.el``,
  ``.ycm_extra_conf.py``, editor-run JavaScript configs (ESLint, Prettier, Stylelint)
  and ESLint/Prettier configs that name plugins or a parser, npm 6's
  ``node_modules/.hooks``.
- ``symlink-out``: a symbolic link whose target leaves the working dir: a later write
  through it (a shell redirection, an editor's save) lands outside, on a start-up file.

Inert, on purpose: ``node_modules`` contents, ``node_modules/.bin`` included (on PATH only
under ``npm run``/``npx``, which run what ``package.json`` names: the user's command;
install scripts are not run on the host), ``.editorconfig``, ``Makefile``, a project's
``setup.py`` and ``noxfile.py`` (at the top of the working dir, though, any ``*.py`` is a
module a kernel there can import), CI files (``.github/workflows/*.yml`` run
elsewhere), notebooks, test files, wheels, object files and archives, ``*.mplstyle``
(named by the user, and matplotlib ignores ``backend`` in styles).

Deletions are inert: without the file, the tool falls back to what the host already had
(an installed module, the user's own configuration, defaults). Except package-manager
configuration (``.npmrc``, ``.yarnrc*``, ``pip.conf``, ``.condarc``, ``bunfig.toml``):
deleting it can switch off a setting that kept code from running (``ignore-scripts``,
``enableScripts: false``, a pinned private index), so the deletion is held.
"""

from __future__ import annotations

import configparser
import contextlib
import fnmatch
import functools
import importlib.machinery
import json
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .postrun import git_config_runs_programs
from .protected import HOME_PROTECTED

try:  # Python 3.11+; on 3.10 a TOML file is held, not judged.
    import tomllib as _toml
except ImportError:  # pragma: no cover - Python 3.10
    _toml = None  # type: ignore[assignment]

INERT = "inert"
BYTECODE = "bytecode"
STARTUP_HOOK = "startup-hook"
EXECUTABLE_ON_PATH = "executable-on-path"
IMPORTABLE = "importable"
REPOSITORY = "repository"
TOOL_CONFIG = "tool-config"
TOOL_CODE = "tool-code"
SYMLINK_OUT = "symlink-out"

#: Past this size a configuration file is not parsed: it is held.
MAX_CONFIG_BYTES = 256 << 10

Content = bytes | Callable[[], "bytes | None"] | None


@dataclass(frozen=True)
class Verdict:
    """What to do with one change: ``active`` ones are held for review."""

    active: bool
    klass: str
    #: One line for the user: why it is held (or why it is not).
    reason: str


def _active(klass: str, reason: str) -> Verdict:
    return Verdict(True, klass, reason)


_INERT = Verdict(False, INERT, "no host tool runs or loads it unless the user names it")


@dataclass(frozen=True)
class HostContext:
    """What the host's tools read, gathered once (``current()``), or built for a test."""

    #: Directories the host's Python imports from (real paths): sys.path, site dirs.
    import_dirs: frozenset[str] = frozenset()
    #: Site dirs, where ``site`` runs ``.pth`` files at start.
    site_dirs: frozenset[str] = frozenset()
    #: Directories on the host's PATH (real paths).
    path_dirs: frozenset[str] = frozenset()
    #: The user's home (real path).
    home: str = ""
    #: Top-level module and package names the host's Python can import.
    importable: frozenset[str] = frozenset()
    #: Files named by the host's environment as start-up files (PYTHONSTARTUP...).
    startup_files: frozenset[str] = field(default_factory=frozenset)
    #: Of ``importable``, the namespace packages (a directory without ``__init__.py`` in
    #: every import dir that has it): a directory of that name elsewhere joins them.
    namespaces: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def current(cls) -> HostContext:
        """This process's host, computed once per process."""
        return _current()

    @classmethod
    def build(cls, *, sys_path: Iterable[str], site_dirs: Iterable[str] = (),
              path: str = "", home: str = "",
              environ: dict[str, str] | None = None) -> HostContext:
        """From explicit inputs: the host's ``sys.path`` and site dirs, ``$PATH``, home."""
        sites = {os.path.realpath(d) for d in site_dirs if d}
        imports = {os.path.realpath(d) for d in sys_path if d and os.path.isdir(d)} | sites
        path_dirs = {os.path.realpath(d) for d in path.split(os.pathsep) if os.path.isabs(d)}
        names = set(sys.builtin_module_names) | set(getattr(sys, "stdlib_module_names", ()))
        portions: set[str] = set()
        regular: set[str] = set(names)
        for directory in sorted(imports):
            found = _top_level_names(directory)
            names.update(found)
            for name in found:
                if os.path.isdir(os.path.join(directory, name)) and not os.path.exists(
                        os.path.join(directory, name, "__init__.py")):
                    portions.add(name)
                else:
                    regular.add(name)
        env = environ or {}
        startup = {os.path.realpath(os.path.expanduser(env[k]))
                   for k in ("PYTHONSTARTUP", "BASH_ENV", "ENV") if env.get(k)}
        return cls(frozenset(imports), frozenset(sites), frozenset(path_dirs),
                   os.path.realpath(home) if home else "", frozenset(names),
                   frozenset(startup), frozenset(portions - regular))


def _top_level_names(directory: str) -> set[str]:
    names: set[str] = set()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return names
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        module = entry.name if is_dir else _module_name(entry.name)
        if module and module.isidentifier():
            names.add(module)
    return names


def _current() -> HostContext:
    """The host as it is now: computed again when its PATH, import path, home or start-up
    variables changed (``%env PATH=...`` in a kernel), else the cached one."""
    env = os.environ
    return _context_for(tuple(sys.path), env.get("PATH", ""), os.path.expanduser("~"),
                        tuple(env.get(k, "") for k in ("PYTHONSTARTUP", "BASH_ENV", "ENV")))


@functools.lru_cache(maxsize=4)
def _context_for(sys_path: tuple[str, ...], path: str, home: str,
                 startup: tuple[str, ...]) -> HostContext:
    import site

    sites: list[str] = []
    try:
        sites.extend(site.getsitepackages())
        sites.append(site.getusersitepackages())
    except Exception:  # some embedders' site module lacks these
        pass
    sites.extend(p for p in sys_path if p.endswith(("site-packages", "dist-packages")))
    return HostContext.build(sys_path=sys_path, site_dirs=sites, path=path, home=home,
                             environ=dict(zip(("PYTHONSTARTUP", "BASH_ENV", "ENV"), startup,
                                              strict=True)))


# -- names -----------------------------------------------------------------------------------

_EXTENSION_SUFFIXES = tuple(sorted(set(importlib.machinery.EXTENSION_SUFFIXES)
                                   | {".so", ".pyd", ".abi3.so"}, key=len, reverse=True))
_SOURCE_SUFFIXES = (".py", ".pyw")


#: Another interpreter's extension module: ``NAME.cpython-310-x86_64-linux-gnu.so``.
_OTHER_EXTENSION = re.compile(r"^(\w+)\.(cpython|pypy|graalpy)[-\w]*\.(so|pyd)$")


def _module_name(name: str) -> str | None:
    """The module a file is imported as (``x.py``, ``x.abi3.so``), or None."""
    other = _OTHER_EXTENSION.match(name)
    if other:
        return other.group(1)
    for suffix in _SOURCE_SUFFIXES + _EXTENSION_SUFFIXES:
        if name.endswith(suffix):
            base = name[:-len(suffix)]
            return base if base.isidentifier() else None
    return None


def _is_module_file(name: str) -> bool:
    return _module_name(name) is not None


def _module_stem(name: str) -> str:
    return name.partition(".")[0]


#: Names a working dir holds without meaning a module the host imports unnamed.
_NEVER_IMPORTED = frozenset({
    "test", "tests", "this", "antigravity", "idlelib", "turtledemo", "__phello__",
    "__hello__", "__main__", "setup", "conftest", "docs", "doc", "examples", "example",
    "scripts", "benchmarks", "main", "__init__",
})

#: Variables of a ``.env`` that make a program load or run code.
_ENV_EXEC = re.compile(
    r"(?i)^(LD_\w+|DYLD_\w+|PYTHON\w*|PIP_\w+|NODE_\w+|NPM_CONFIG_\w+|BASH_ENV|ENV|SHELL|"
    r"PATH|PROMPT_COMMAND|PS[0-4]|EDITOR|VISUAL|PAGER|BROWSER|GIT_\w+|SSH_\w+|PERL5?\w*|"
    r"RUBY\w*|GEM_\w+|JAVA_TOOL_OPTIONS|_JAVA_OPTIONS|JDK_JAVA_OPTIONS|CLASSPATH|"
    r"R_PROFILE\w*|R_ENVIRON\w*|R_LIBS\w*|JULIA_\w+|IPYTHONDIR|JUPYTER_\w+|MPLBACKEND|"
    r"MATPLOTLIBRC|MPLCONFIGDIR|XDG_\w+|HOME|ZDOTDIR|INPUTRC|LESSOPEN|LESSCLOSE|"
    r"DOCKER_\w+|KUBECONFIG|CONDA_\w+|VIRTUAL_ENV|UV_\w+|POETRY_\w+|PIPENV_\w+|"
    r"COMPOSE_\w+|FLASK_APP|DJANGO_SETTINGS_MODULE|GCONV_PATH|TERMINFO\w*)$")

#: Settings of pip that cannot make it fetch or run other code.
_PIP_SAFE = frozenset({
    "timeout", "default-timeout", "retries", "disable-pip-version-check", "no-color",
    "progress-bar", "quiet", "verbose", "no-input", "no-cache-dir", "log", "root-user-action",
    "exists-action", "no-warn-script-location", "no-warn-conflicts", "require-virtualenv",
    "require-hashes", "only-binary", "prefer-binary", "no-python-version-warning",
    "keyring-provider",
})
#: Settings of npm (and yarn 1, which reads the same keys) that run nothing and fetch
#: nothing from elsewhere.
_NPM_SAFE = frozenset({
    "save", "save-exact", "save-prefix", "save-dev", "save-optional", "save-peer", "fund",
    "audit", "audit-level", "progress", "loglevel", "package-lock", "package-lock-only",
    "engine-strict", "legacy-peer-deps", "strict-peer-deps", "color", "update-notifier",
    "lockfile-version", "ignore-scripts", "fetch-retries", "fetch-timeout", "prefer-offline",
    "prefer-online", "offline", "omit", "include", "install-links", "sign-git-commit",
    "sign-git-tag", "message", "unicode", "usage", "searchlimit", "init-author-name",
    "init-author-email", "init-author-url", "init-license", "init-version", "workspaces-update",
    "auto-install-peers", "strict-ssl", "shamefully-hoist", "public-hoist-pattern",
    "network-timeout", "frozen-lockfile", "yarn-offline-mirror-pruning",
    "disable-self-update-check",
})
#: matplotlibrc keys that run a program, import a module or feed TeX.
_MPL_EXEC = re.compile(r"(?i)^(backend|backend_fallback|.*(path|preamble|texsystem|usetex|"
                       r"args|command|writer)|animation\..*|webagg\..*)$")
_MPL_BUILTIN_BACKENDS = frozenset({
    "agg", "cairo", "pdf", "pgf", "ps", "svg", "template", "gtk3agg", "gtk3cairo", "gtk4agg",
    "gtk4cairo", "macosx", "nbagg", "notebook", "qtagg", "qtcairo", "qt5agg", "qt5cairo",
    "tkagg", "tkcairo", "webagg", "wx", "wxagg", "wxcairo", "inline", "ipympl", "widget",
})
#: Python tool settings (coverage, mypy, pylint) that load code whatever their value.
_PYTOOL_EXEC = re.compile(r"(?i)^(plugins|load[-_]plugins|init[-_]hook)$")
#: pytest options in ``addopts`` that import a module or read other configuration.
_PYTEST_EXEC_OPTS = ("-p", "-c", "-o", "--override-ini", "--config-file", "--confcutdir",
                     "--rootdir", "--pyargs", "--import-mode", "--pdbcls", "--cov-config",
                     "--plugin", "-W", "--pythonwarnings",
                     # --basetemp: pytest deletes that directory, wherever it is, and
                     # makes it again.
                     "--basetemp")
#: A warnings filter (``action:message:category:module:lineno``) whose category is a
#: dotted name: Python (and pytest's ``filterwarnings``) imports that module to find it.
_WARNING_IMPORTS = re.compile(r"^[^:]*:[^:]*:\s*[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+\s*(:|$)")
_PYTOOL_SECTIONS = re.compile(r"(?i)^(pytest|tool:pytest|coverage:.*|run|mypy|mypy-.*|"
                              r"pylint.*|main|master|MASTER|tool\.(pytest|coverage|mypy|"
                              r"pylint)(\..*)?)$")
#: VS Code setting keys that name a program, an interpreter, a path or an environment.
_VSCODE_EXEC = re.compile(r"(?i)(path|interpreter|executable|command|cmd|shell|env|args|"
                          r"profile|program|server|runtime|exec|task|script|plugin|node|"
                          r"launch|terminal|python\.|jupyter\.|git\.|npm\.)")
#: cargo configuration that runs a program.
_CARGO_EXEC = re.compile(r"(?i)(runner|rustc|wrapper|linker|alias|credential|env|"
                         r"build-std|target-dir|\bar\b|cargo-new)")
#: git attributes that select a driver; their builtin values run nothing extra.
_GIT_DRIVER = re.compile(r"(?<![-!\w])(filter|diff|merge|textconv)\s*=\s*([^\s]+)")
_GIT_BUILTIN_DRIVERS = frozenset({
    "lfs", "text", "binary", "union", "ada", "bash", "bibtex", "cpp", "csharp", "css",
    "dts", "elixir", "fortran", "fountain", "golang", "html", "java", "kotlin", "markdown",
    "matlab", "objc", "pascal", "perl", "php", "python", "ruby", "rust", "scheme", "tex",
})
_VERSION_NAME = re.compile(r"^(lts/)?[A-Za-z0-9*][A-Za-z0-9._+@*-]*$")

#: Held whatever they say (no parser here, or all they hold is code or commands).
_CODE_NAMES: dict[str, str] = {
    "conftest.py": "pytest imports every conftest.py on the way to the tests it runs",
    ".pdbrc": "pdb runs ./.pdbrc and ~/.pdbrc (its ! lines are Python) when it starts",
    ".Rprofile": "R runs ./.Rprofile at start",
    ".Renviron": "R reads ./.Renviron at start (R_PROFILE_USER, R_LIBS name code)",
    ".irbrc": "irb runs ./.irbrc at start",
    ".pryrc": "pry runs ./.pryrc at start",
    ".gdbinit": "gdb runs ./.gdbinit when its auto-load safe-path allows",
    ".lldbinit": "lldb runs ./.lldbinit when allowed",
    ".exrc": "vim runs ./.exrc with 'exrc' set",
    ".nvimrc": "neovim runs ./.nvimrc with 'exrc' set",
    ".nvim.lua": "neovim runs ./.nvim.lua with 'exrc' set",
    ".dir-locals.el": "Emacs applies .dir-locals.el (eval forms) in the tree below",
    ".dir-locals-2.el": "Emacs applies .dir-locals-2.el (eval forms) in the tree below",
    ".ycm_extra_conf.py": "YouCompleteMe imports .ycm_extra_conf.py",
    ".perldb": "the Perl debugger runs ./.perldb",
    ".envrc": "direnv runs .envrc on entering the directory",
    "sitecustomize.py": "Python imports sitecustomize at every start",
    "usercustomize.py": "Python imports usercustomize at every start",
    "pyvenv.cfg": "pyvenv.cfg sets what a virtual environment's Python starts with",
    ".pre-commit-config.yaml": "pre-commit runs the hooks it names at git commit",
    "lefthook.yml": "lefthook runs the commands it names at git commit",
    ".lefthook.yml": "lefthook runs the commands it names at git commit",
    "lefthook-local.yml": "lefthook runs the commands it names at git commit",
    ".yarnrc.yml": "yarn 2+ runs its yarnPath and plugins",
    ".condarc": "conda installs from the channels it names",
    "condarc": "conda installs from the channels it names",
    "bunfig.toml": "bun runs its preload scripts",
    ".mise.toml": "mise runs its hooks and tasks",
    "mise.toml": "mise runs its hooks and tasks",
    ".rtx.toml": "rtx runs its hooks",
    ".devcontainer.json": "a dev container's lifecycle commands run when it opens",
    "kernel.json": "a Jupyter kernelspec: its argv runs when the kernel starts",
}
_CODE_KLASS = {"sitecustomize.py": STARTUP_HOOK, "usercustomize.py": STARTUP_HOOK,
               "pyvenv.cfg": STARTUP_HOOK, ".envrc": STARTUP_HOOK,
               ".pre-commit-config.yaml": REPOSITORY, "lefthook.yml": REPOSITORY,
               ".lefthook.yml": REPOSITORY, "lefthook-local.yml": REPOSITORY,
               ".yarnrc.yml": TOOL_CONFIG, ".condarc": TOOL_CONFIG, "condarc": TOOL_CONFIG,
               "bunfig.toml": TOOL_CONFIG, ".mise.toml": TOOL_CONFIG, "mise.toml": TOOL_CONFIG,
               ".rtx.toml": TOOL_CONFIG, ".devcontainer.json": TOOL_CONFIG}
_JS_CONFIG = re.compile(r"^(\.?eslint\.config|\.eslintrc|\.?prettier(rc)?(\.config)?|"
                        r"\.?stylelint(rc)?(\.config)?)\.(c|m)?(js|ts)$")
_JS_JSON_CONFIG = re.compile(r"^(\.eslintrc|\.prettierrc|\.stylelintrc)(\.json|\.ya?ml)?$")
#: Package-manager configuration whose deletion is held (it can turn a safeguard off).
_DELETION_HELD = frozenset({".npmrc", ".yarnrc", ".yarnrc.yml", "pip.conf", "pip.ini",
                            ".condarc", "condarc", "bunfig.toml"})
#: Home-relative entries not in ``protected.HOME_PROTECTED`` that run or send something.
_HOME_EXTRA: dict[str, str] = {
    ".pythonrc": "Python start-up file (PYTHONSTARTUP)",
    ".pythonrc.py": "Python start-up file (PYTHONSTARTUP)",
    ".aws": "AWS configuration (credential_process runs a program)",
    ".config/gcloud": "gcloud configuration",
    ".azure": "Azure CLI configuration",
    ".psqlrc": "psql start-up file (\\! runs commands)",
    ".sqliterc": "sqlite3 start-up file (.shell runs commands)",
    ".curlrc": "curl defaults",
    ".wgetrc": "wget defaults",
    ".hgrc": "Mercurial configuration (hooks)",
    ".config/matplotlib": "matplotlib configuration",
    ".matplotlib": "matplotlib configuration",
    ".config/direnv": "direnv configuration (whitelists)",
    ".config/pypoetry": "poetry configuration",
    ".config/uv": "uv configuration",
    ".cargo/config": "cargo configuration",
    ".cargo/config.toml": "cargo configuration",
    ".cargo/bin": "programs on the login PATH",
    "bin": "programs on the login PATH",
    ".npm-global": "npm's global prefix",
    ".pdbrc": "pdb start-up file",
}


# -- classify --------------------------------------------------------------------------------


def classify(path: str, *, working_dir: str, content: Content = None, mode: int = 0o100644,
             is_symlink: bool = False, link_target: str | None = None, deleted: bool = False,
             host: HostContext | None = None,
             exists: Callable[[str], bool] = os.path.lexists) -> Verdict:
    """Judge one changed path (absolute, or relative to ``working_dir``).

    ``content``: the new bytes, or a callable that returns them (called at most once,
    only when a rule reads content), or None when they cannot be read. ``mode``: the
    new entry's ``st_mode``. ``exists``: whether a path exists after the change (the
    layer over the host), asked about siblings (``__init__.py``, ``pyvenv.cfg``).
    ``host``: default ``HostContext.current()``.
    """
    host = host or HostContext.current()
    wd = os.path.realpath(working_dir)
    full = path if os.path.isabs(path) else os.path.join(wd, path)
    full = os.path.join(os.path.realpath(os.path.dirname(os.path.normpath(full))),
                        os.path.basename(os.path.normpath(full)))
    name = os.path.basename(full)
    if deleted:
        if name in _DELETION_HELD:
            return _active(TOOL_CONFIG, f"deleting {name} can turn off a setting that kept "
                           "code from running (ignore-scripts, a pinned index)")
        return _INERT
    reader = _Reader(None if is_symlink else content)
    verdict = _judge(full, name, wd, mode, host, reader, exists)
    if verdict.active:
        return verdict
    if is_symlink and link_target is not None:
        target = os.path.normpath(os.path.join(os.path.dirname(full), link_target))
        if not _under(target, wd):
            return _active(SYMLINK_OUT, f"a symlink to {link_target}, outside the working dir: "
                           "a later write through it lands there")
    return verdict


class _Reader:
    """The content, read once, as text when it is small UTF-8 (else None: hold)."""

    def __init__(self, content: Content):
        self._content = content
        self._done = False
        self._text: str | None = None

    def text(self) -> str | None:
        if not self._done:
            self._done = True
            data = self._content() if callable(self._content) else self._content
            if data is not None and len(data) <= MAX_CONFIG_BYTES and b"\0" not in data:
                try:
                    self._text = data.decode("utf-8").removeprefix("\ufeff")
                except UnicodeDecodeError:
                    self._text = None
        return self._text


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _judge(full: str, name: str, wd: str, mode: int, host: HostContext, reader: _Reader,
           exists: Callable[[str], bool]) -> Verdict:
    parts = full.split("/")
    parent = os.path.dirname(full)
    is_dir = stat.S_ISDIR(mode)

    # Bytecode.
    if "__pycache__" in parts or name.endswith((".pyc", ".pyo")):
        return _active(BYTECODE, "Python bytecode: never applied, the host compiles its own")

    # Repositories.
    verdict = _repository(full, name, parts, wd, is_dir, reader, exists)
    if verdict is not None:
        return verdict

    # Start-up hooks.
    if name.endswith(".pth") and not is_dir and (
            parent in host.site_dirs or os.path.basename(parent) in (
                "site-packages", "dist-packages")):
        return _active(STARTUP_HOOK, "a .pth file in a site dir: Python runs its import "
                       "lines at every start")
    if _module_stem(name) in ("sitecustomize", "usercustomize") and (
            _is_module_file(name) or is_dir):
        return _active(STARTUP_HOOK, f"Python imports {_module_stem(name)} at every start")
    if full in host.startup_files:
        return _active(STARTUP_HOOK, "a start-up file the host's environment names "
                       "(PYTHONSTARTUP, BASH_ENV, ENV)")
    directory = os.path.basename(parent)
    if directory in ("bin", "Scripts") and (
            name.lower().startswith("activate")
            or exists(os.path.join(os.path.dirname(parent), "pyvenv.cfg"))):
        return _active(STARTUP_HOOK, f"{directory}/{name} of a virtual environment: "
                       "activation runs it or puts it first on PATH")
    if re.search(r"/etc/conda/(de)?activate\.d/[^/]+$", full):
        return _active(STARTUP_HOOK, "conda sources it when the environment is activated")

    # The home's start-up files and configuration.
    if host.home and _under(full, host.home) and full != host.home:
        rel = os.path.relpath(full, host.home)
        why = _home_entry(rel)
        if why is not None and not _judged_name(name):
            klass = EXECUTABLE_ON_PATH if "PATH" in why else (
                STARTUP_HOOK if "start-up" in why else TOOL_CONFIG)
            return _active(klass, f"~/{rel}: {why}")

    # Anything in a directory on the host's PATH.
    if parent in host.path_dirs:
        return _active(EXECUTABLE_ON_PATH, f"written into {parent}, on the host's PATH: "
                       "a command of that name runs it")

    if name in _CODE_NAMES and not is_dir and (name != "kernel.json" or "kernels" in parts):
        return _active(_CODE_KLASS.get(name, TOOL_CODE), _CODE_NAMES[name])

    # In a virtual environment's own site-packages: its Python imports it.
    site = re.search(r"^(.*)/(lib/python[^/]+|Lib)/site-packages/", full)
    if site and exists(os.path.join(site.group(1), "pyvenv.cfg")):
        return _active(IMPORTABLE, f"in the site-packages of the virtual environment "
                       f"{site.group(1)}: its Python imports it")
    # An extension module beside a source of the same name: Python loads it instead.
    if not is_dir and name.endswith((".so", ".pyd")) and _module_name(name) and exists(
            os.path.join(parent, f"{_module_name(name)}.py")):
        return _active(IMPORTABLE, f"an extension module beside {_module_name(name)}.py: "
                       "Python imports it instead of the source")

    # Importable.
    verdict = _importable(full, name, parts, wd, is_dir, host, exists)
    if verdict is not None:
        return verdict

    if is_dir:
        return _INERT

    # Code a tool runs by convention, and configuration judged by content.
    return _tool(full, name, parts, reader)


def _home_entry(rel: str) -> str | None:
    for entry, (kind, why) in HOME_PROTECTED.items():
        if fnmatch.fnmatchcase(rel, entry) or (
                kind == "dir" and fnmatch.fnmatchcase(rel, entry + "/*")):
            return why
    for entry, why in _HOME_EXTRA.items():
        if rel == entry or rel.startswith(entry + "/"):
            return why
    return None


#: Files judged by content wherever they are (home included).
_JUDGED = frozenset({".gitconfig", ".npmrc", ".yarnrc", "pip.conf", "pip.ini", "matplotlibrc",
                     "settings.json", "tasks.json"})


def _judged_name(name: str) -> bool:
    return name in _JUDGED


def _repository(full: str, name: str, parts: list[str], wd: str, is_dir: bool,
                reader: _Reader, exists: Callable[[str], bool]) -> Verdict | None:
    parent = os.path.dirname(full)
    in_git = ".git" in parts[:-1]
    gitdir_parent = in_git or _looks_like_gitdir(parent, exists)
    if name == ".git" and not is_dir:
        text = reader.text()
        if text is None:
            return _active(REPOSITORY, "a .git file whose content could not be read: it "
                           "points git at another repository's config and hooks")
        target = text.strip().removeprefix("gitdir:").strip()
        resolved = os.path.normpath(os.path.join(parent, target))
        if not _under(resolved, wd):
            return _active(REPOSITORY, f"a .git file pointing git at {target}, outside the "
                           "working dir (its config and hooks)")
        return _INERT
    if is_dir:
        return None
    if os.path.basename(parent) == "hooks" and (
            in_git or _looks_like_gitdir(os.path.dirname(parent), exists)):
        if name.endswith(".sample"):
            return _INERT
        return _active(REPOSITORY, f"a git hook: git runs hooks/{name} on its own")
    if gitdir_parent and name in ("config", "config.worktree"):
        return _git_config(reader, "the repository's git config")
    if name in (".gitmodules", ".gitconfig") or full.endswith("/.config/git/config") or (
            ".hg" in parts[:-1] and name == "hgrc"):
        if name == "hgrc":
            return _active(REPOSITORY, "Mercurial's repository config: its hooks run")
        verdict = _git_config(reader, name)
        if verdict.active or name != ".gitmodules":
            return verdict
        text = reader.text() or ""
        if re.search(r"(?im)^\s*(url|path)\s*=\s*-", text):
            return _active(REPOSITORY, ".gitmodules with a value starting with '-' (read "
                           "as an option by the programs git runs)")
        return _INERT
    if name == ".gitattributes" or (gitdir_parent and full.endswith("/info/attributes")) \
            or full.endswith("/.config/git/attributes"):
        return _git_attributes(reader)
    if ".husky" in parts[:-1] and name not in (".gitignore",):
        return _active(REPOSITORY, "husky points git's hooks at .husky/: git runs it")
    named = _named_by_git_config(full, wd)
    if named is not None:
        return _active(REPOSITORY, named)
    return None


_GIT_NAMING_KEYS = frozenset({
    "hookspath", "path", "fsmonitor", "clean", "smudge", "process", "textconv", "command",
    "driver", "cmd", "program", "editor", "pager", "askpass", "sshcommand"})


def _named_by_git_config(full: str, wd: str) -> str | None:
    """Whether the host's git configuration (the repository's own, the user's, the system's)
    already names ``full``: a file in ``core.hooksPath``, or one an ``include.path``, a
    driver or a program setting points at. Git runs or reads it on its own."""
    top = _work_tree_of(os.path.dirname(full), wd)
    configs = [os.path.expanduser("~/.gitconfig"), os.path.expanduser("~/.config/git/config"),
               "/etc/gitconfig"]
    if top is not None:
        configs.insert(0, os.path.join(top, ".git", "config"))
    base = top or wd
    for config in configs:
        for key, value, word in _naming_entries(config):
            target = os.path.normpath(os.path.join(base, os.path.expanduser(word)))
            if full == target or (key == "hookspath" and _under(full, target)):
                return (f"the host's git config ({config}) names it ({key} = {value}): git "
                        "runs or reads it on its own")
    return None


def _naming_entries(config: str) -> list[tuple[str, str, str]]:
    """(key, value, the path it names) of a git config file's keys that name a file."""
    def read() -> list[tuple[str, str, str]]:
        try:
            with open(config, encoding="utf-8", errors="replace") as handle:
                text = handle.read(MAX_CONFIG_BYTES)
        except OSError:
            return []
        found = []
        for key, value in re.findall(r"(?im)^\s*([\w.-]+)\s*=\s*(.+?)\s*$", text):
            key = key.lower()
            word = value.strip().strip('"').split()[0] if value.strip() else ""
            if key in _GIT_NAMING_KEYS and word and "://" not in word:
                found.append((key, value.strip(), word))
        return found

    return _memo(("git-config", config), read)


def _work_tree_of(directory: str, wd: str) -> str | None:
    """The host work tree that holds ``directory`` (the nearest directory with a ``.git``)."""
    return _memo(("work-tree", directory, wd), lambda: _find_work_tree(directory, wd))


def _find_work_tree(directory: str, wd: str) -> str | None:
    while True:
        if os.path.isdir(os.path.join(directory, ".git")):
            return directory
        if directory in ("/", "") or (not _under(directory, wd) and directory != wd
                                      and not _under(wd, directory)):
            return None
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _looks_like_gitdir(directory: str, exists: Callable[[str], bool]) -> bool:
    if os.path.basename(directory) == ".git":
        return True
    return exists(os.path.join(directory, "HEAD")) and exists(os.path.join(directory,
                                                                            "objects"))


def _git_config(reader: _Reader, what: str) -> Verdict:
    text = reader.text()
    if text is None:
        return _active(REPOSITORY, f"{what} could not be read: git may run what it names")
    keys = git_config_runs_programs(text)
    if keys:
        return _active(REPOSITORY, f"{what} makes git run a program ({', '.join(keys[:4])})")
    return _INERT


def _git_attributes(reader: _Reader) -> Verdict:
    text = reader.text()
    if text is None:
        return _active(REPOSITORY, "git attributes that could not be read: they may select "
                       "a filter git runs")
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for attribute, value in _GIT_DRIVER.findall(line):
            if value.lower() not in _GIT_BUILTIN_DRIVERS:
                return _active(REPOSITORY, f"git attributes select {attribute}={value}: git "
                               "runs the program configured for that driver")
    return _INERT


def _importable(full: str, name: str, parts: list[str], wd: str, is_dir: bool,
                host: HostContext, exists: Callable[[str], bool]) -> Verdict | None:
    # A host import dir that is not (and does not hold) the working dir: anything in it.
    for directory in host.import_dirs:
        if _under(full, directory) and full != directory and not _under(wd, directory):
            return _active(IMPORTABLE, f"written into {directory}, on the host's import "
                           "path: Python loads what is there")
    if not _under(full, wd) or full == wd:
        return None
    rel = os.path.relpath(full, wd).split("/")
    if "node_modules" in rel:
        if ".hooks" in rel:
            return _active(TOOL_CODE, "node_modules/.hooks: npm 6 runs it at lifecycle events")
        return None
    module = name if is_dir else _module_name(name)
    if module is None or not module.isidentifier():
        return None
    if not all(p.isidentifier() for p in rel[:-1]):
        return _shadowing(full, name, module, rel, wd, is_dir, host, exists)
    top = rel[0] if len(rel) > 1 else module
    # A directory without __init__.py is a namespace portion: Python uses it only when no
    # regular package or module of that name is on the path, or to extend a namespace
    # package (an installed regular package of that name wins, even from later on the path).
    known = top in host.namespaces and top not in _NEVER_IMPORTED
    if len(rel) == 1:
        if not is_dir:
            return _active(IMPORTABLE, f"module {top} in the working dir: a kernel there "
                           f"imports it on 'import {top}' (its dir is first on sys.path)")
        if exists(os.path.join(full, "__init__.py")) or known:
            return _active(IMPORTABLE, f"package {top} in the working dir: a kernel there "
                           f"imports it on 'import {top}'")
        return None
    init = os.path.join(wd, top, "__init__.py")
    if full == init or exists(init) or known:
        return _active(IMPORTABLE, f"part of package {top} in the working dir: a kernel "
                       f"there runs it on 'import {top}...'")
    return _shadowing(full, name, module, rel, wd, is_dir, host, exists)


def _shadowing(full: str, name: str, module: str, rel: list[str], wd: str, is_dir: bool,
               host: HostContext, exists: Callable[[str], bool]) -> Verdict | None:
    """Below the working dir: a kernel starts in a notebook's own directory."""
    where = os.path.relpath(os.path.dirname(full), wd)
    if len(rel) >= 2 and _holds_notebook(os.path.dirname(full)) and (
            not is_dir or exists(os.path.join(full, "__init__.py"))):
        return _active(IMPORTABLE, f"module {module} beside a notebook in {where}/: its "
                       f"kernel (started there) imports it on 'import {module}', whether "
                       "or not anything is installed by that name")
    if module in host.importable and module not in _NEVER_IMPORTED and (
            not is_dir or exists(os.path.join(full, "__init__.py"))):
        return _active(IMPORTABLE, f"shadows 'import {module}' for a kernel started in "
                       f"{where}/ (Jupyter starts it in the notebook's directory)")
    if name == "__init__.py" and len(rel) >= 2:
        package = rel[-2]
        if package in host.importable and package not in _NEVER_IMPORTED:
            return _active(IMPORTABLE, f"makes {package}/ a package that shadows 'import "
                           f"{package}' for a kernel started beside it")
    return None


def _holds_notebook(directory: str) -> bool:
    """Whether the host directory holds a notebook (Jupyter starts its kernel there)."""
    def look() -> bool:
        try:
            return any(entry.endswith(".ipynb") for entry in os.listdir(directory))
        except OSError:
            return False

    return _memo(("notebook", directory), look)


_BATCH = threading.local()


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Classify many changes of one command: what the host's files say (git configs, work
    trees, notebooks beside a module) is read once for the batch, not once per change."""
    outer = getattr(_BATCH, "memo", None)
    _BATCH.memo = {} if outer is None else outer
    try:
        yield
    finally:
        _BATCH.memo = outer


def _memo(key: tuple, compute: Callable[[], Any]) -> Any:
    memo = getattr(_BATCH, "memo", None)
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def _tool(full: str, name: str, parts: list[str], reader: _Reader) -> Verdict:
    if re.fullmatch(r"ipython_\w*config\.(py|json)|jupyter_\w*config\.(py|json)", name) or (
            re.search(r"/profile_[^/]+/startup/[^/]+$", full)):
        return _active(TOOL_CODE, "IPython or Jupyter loads it from its config path at start")
    if "/etc/jupyter/" in full or "/share/jupyter/lab/settings/" in full:
        return _active(TOOL_CONFIG, "Jupyter configuration of an environment's prefix")
    if _JS_CONFIG.match(name):
        return _active(TOOL_CODE, f"{name}: the editor's linter or formatter runs it when a "
                       "file in the project opens")
    if _JS_JSON_CONFIG.match(name):
        text = reader.text()
        if text is None or re.search(r"(plugins|parser|extends|resolver)", text):
            return _active(TOOL_CONFIG, f"{name} names plugins or a parser: the editor's "
                           "linter or formatter loads them")
        return _INERT
    if ".idea" in parts[:-1] and name != ".gitignore":
        return _active(TOOL_CONFIG, "JetBrains project settings (run configurations, "
                       "interpreters): not parsed here")
    if ".devcontainer" in parts[:-1]:
        return _active(TOOL_CONFIG, "dev container settings: their commands run when it opens")
    if name == ".flaskenv" or (name.startswith(".env") and name not in (
            ".env.example", ".env.sample", ".env.template", ".env.dist", ".envrc")):
        return _env_file(name, reader)
    judge = _JUDGES.get(name)
    if judge is None and name.endswith(".code-workspace"):
        judge = _vscode_settings
    if judge is None and name in ("config", "config.toml") and ".cargo" in parts[:-1]:
        judge = _cargo
    if judge is None:
        return _INERT
    if name in ("settings.json", "tasks.json") and ".vscode" not in parts[:-1]:
        return _INERT
    text = reader.text()
    if text is None:
        return _active(TOOL_CONFIG, f"{name} could not be read (too large, binary or not "
                       "UTF-8): the tool that reads it may run what it names")
    return judge(name, text)


def _ini(text: str) -> configparser.RawConfigParser | None:
    parser = configparser.RawConfigParser(strict=False, interpolation=None,
                                          allow_no_value=True)
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    return parser


def _unparsable(name: str) -> Verdict:
    return _active(TOOL_CONFIG, f"{name} could not be parsed: the tool that reads it may run "
                   "what it names")


def _pip(name: str, text: str) -> Verdict:
    parser = _ini(text)
    if parser is None:
        return _unparsable(name)
    risky = [f"{s}.{k}" for s in parser.sections() for k in parser[s]
             if k.lower() not in _PIP_SAFE]
    if risky:
        return _active(TOOL_CONFIG, f"{name} sets {', '.join(risky[:3])}: pip fetches or builds "
                       "code by it at the next install")
    return _INERT


def _npm(name: str, text: str) -> Verdict:
    risky = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removesuffix("[]").lower()
        if name == ".yarnrc" and not sep:
            key, _, value = line.partition(" ")
            key = key.strip().strip('"').lower()
        unsafe_value = key == "ignore-scripts" and value.strip().lower() != "true"
        if unsafe_value or key not in _NPM_SAFE:
            risky.append(key)
    if risky:
        return _active(TOOL_CONFIG, f"{name} sets {', '.join(risky[:3])}: npm or yarn may run "
                       "or fetch code by it (script-shell, node-options, registry)")
    return _INERT


def _matplotlibrc(name: str, text: str) -> Verdict:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            return _unparsable(name)
        key, value = key.strip(), value.strip().strip("\"'")
        if not _MPL_EXEC.match(key):
            continue
        if key in ("backend", "backend_fallback") and (
                value.lower() in _MPL_BUILTIN_BACKENDS or value.lower() in ("true", "false")):
            continue
        return _active(TOOL_CONFIG, f"matplotlibrc sets {key}: matplotlib imports a module or "
                       "runs a program by it")
    return _INERT


def _pytools(name: str, text: str) -> Verdict:
    """pytest, coverage, mypy and pylint settings in an INI file."""
    parser = _ini(text)
    if parser is None:
        return _unparsable(name)
    for section in parser.sections():
        if not _PYTOOL_SECTIONS.match(section):
            continue
        for key, value in parser[section].items():
            if _pytool_runs(key, value):
                return _active(TOOL_CONFIG, f"{name} [{section}] {key}: the test or lint tool "
                               "loads code by it")
    return _INERT


def _pytool_runs(key: str, value: object) -> bool:
    """Whether a pytest/coverage/mypy/pylint setting makes the tool import or run code."""
    key = key.rpartition(".")[2].lower().replace("-", "_")
    if _PYTOOL_EXEC.match(key):
        return True
    words = value if isinstance(value, list) else str(value or "").split()
    words = [str(w) for w in words]
    if key == "addopts":
        return any(w.startswith(_PYTEST_EXEC_OPTS) for w in words)
    if key == "filterwarnings":
        lines = value if isinstance(value, list) else str(value or "").splitlines()
        return any(_WARNING_IMPORTS.match(str(line).strip()) for line in lines)
    if key == "pythonpath":
        return any(os.path.isabs(w) or ".." in w.split("/") for w in words)
    return False


def _toml_table(name: str, text: str) -> dict | Verdict:
    """The TOML file's table, or the verdict for one that cannot be read (held)."""
    if _toml is None:
        return _unparsable(name)
    try:
        return _toml.loads(text)
    except (ValueError, RecursionError):
        return _unparsable(name)


def _pyproject(name: str, text: str) -> Verdict:
    data = _toml_table(name, text)
    if isinstance(data, Verdict):
        return data
    if name != "pyproject.toml":  # pytest 9's pytest.toml: a [pytest] table
        data = {"tool": {"pytest": data.get("pytest")}}
    tool = data.get("tool") if isinstance(data.get("tool"), dict) else {}
    for section in ("pytest", "coverage", "mypy", "pylint"):
        values = tool.get(section)
        if not isinstance(values, dict):
            continue
        for key, value in _flatten(values):
            if _pytool_runs(key, value):
                return _active(TOOL_CONFIG, f"{name} [tool.{section}] {key}: the test or "
                               "lint tool loads code by it")
    return _INERT


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _json(name: str, text: str) -> object | None:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _vscode_settings(name: str, text: str) -> Verdict:
    data = _json(name, text)
    if not isinstance(data, dict):
        return _unparsable(name)  # JSON with comments, too: held
    settings = data.get("settings", {}) if name.endswith(".code-workspace") else data
    if name.endswith(".code-workspace") and (data.get("tasks") or data.get("launch")):
        return _active(TOOL_CONFIG, f"{name} defines tasks or launch configurations")
    if not isinstance(settings, dict):
        return _unparsable(name)
    for key in settings:
        if _VSCODE_EXEC.search(key):
            return _active(TOOL_CONFIG, f"{name} sets {key}: VS Code runs or loads what it "
                           "names (an interpreter, a path, an environment)")
    return _INERT


def _vscode_tasks(name: str, text: str) -> Verdict:
    if re.search(r"\"runOn\"\s*:\s*\"folderOpen\"", text) or _json(name, text) is None:
        return _active(TOOL_CONFIG, "VS Code tasks that run when the folder opens (or "
                       "tasks.json that could not be parsed)")
    return _INERT


def _cargo(name: str, text: str) -> Verdict:
    data = _toml_table(name, text)
    if isinstance(data, Verdict):
        return data
    for key, _value in _flatten(data):
        if _CARGO_EXEC.search(key):
            return _active(TOOL_CONFIG, f"cargo configuration sets {key}: cargo runs a program "
                           "by it (rust-analyzer runs cargo when a project opens)")
    return _INERT


def _versions(name: str, text: str) -> Verdict:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        tokens = words[1:] if name == ".tool-versions" else words
        for token in tokens:
            if not _VERSION_NAME.match(token) or ".." in token:
                return _active(TOOL_CONFIG, f"{name} names {token!r}: a version manager's shim "
                               "would run an interpreter from that path")
    return _INERT


def _env_file(name: str, reader: _Reader) -> Verdict:
    text = reader.text()
    if text is None:
        return _active(STARTUP_HOOK, f"{name} could not be read: tools load its variables")
    for line in text.splitlines():
        line = line.strip().removeprefix("export ").strip()
        if not line or line.startswith("#"):
            continue
        key = line.partition("=")[0].strip()
        if _ENV_EXEC.match(key) or not re.fullmatch(r"\w+", key):
            return _active(STARTUP_HOOK, f"{name} sets {key}: a program that loads it (python-"
                           "dotenv, direnv, pipenv, compose) would run code by it")
    return _INERT


_JUDGES: dict[str, Callable[[str, str], Verdict]] = {
    "pip.conf": _pip, "pip.ini": _pip, ".npmrc": _npm, ".yarnrc": _npm,
    "matplotlibrc": _matplotlibrc, "pytest.ini": _pytools, ".pytest.ini": _pytools,
    "tox.ini": _pytools, "setup.cfg": _pytools, ".coveragerc": _pytools, "mypy.ini": _pytools,
    ".mypy.ini": _pytools, ".pylintrc": _pytools, "pylintrc": _pytools,
    "pyproject.toml": _pyproject, "pytest.toml": _pyproject, ".pytest.toml": _pyproject,
    "settings.json": _vscode_settings,
    "tasks.json": _vscode_tasks, ".python-version": _versions, ".tool-versions": _versions,
    ".nvmrc": _versions, ".node-version": _versions, ".ruby-version": _versions,
}
