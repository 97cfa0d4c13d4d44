"""The protected-paths policy as pure functions: what gets protected, hidden or scrubbed.

Fast and sandbox-free (tmp_path only): they pin down the decisions the runsc and
Docker backends render as mounts, so that a user can predict them. Imports are
done inside each test, so a missing name fails that test, not the collection.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def protections_by_path(plan) -> dict[str, object]:
    return {os.fspath(p.path): p for p in plan.protections}


def plan_for(home: Path, policy=None):
    from gvisor_magic.protected import PathPolicy, plan_protection

    return plan_protection(writable=[str(home)], readable=[],
                           policy=policy if policy is not None else PathPolicy(),
                           homes=[str(home)])


def make_repo(root: Path) -> None:
    """A git repository's control files, laid out as ``git init`` makes them."""
    git = root / ".git"
    for sub in ("hooks", "info", "objects", "refs/heads", "refs/tags"):
        (git / sub).mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "config").write_text("[core]\n\trepositoryformatversion = 0\n\tbare = false\n")
    (git / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")


@pytest.fixture
def home(tmp_path) -> Path:
    """A user's home as the working dir: rc files, a project repo, secrets at depth."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# bashrc\n")
    (home / ".profile").write_text("# profile\n")
    make_repo(home / "proj")
    (home / "a" / "b" / ".ssh").mkdir(parents=True)
    (home / "a" / "b" / ".ssh" / "id_ed25519").write_text("KEY\n")
    (home / "sub").mkdir()
    (home / "sub" / ".env").write_text("TOKEN=x\n")
    (home / "sub" / ".env.local").write_text("TOKEN=y\n")
    (home / "sub" / ".env.example").write_text("TOKEN=\n")
    runtime = home / ".local" / "share" / "jupyter" / "runtime"
    runtime.mkdir(parents=True)
    (runtime / "kernel-abc.json").write_text('{"key": "x"}\n')
    (home / "data" / "raw").mkdir(parents=True)
    return home


# -- PathPolicy -------------------------------------------------------------------------------


def test_policy_entries_relax_by_name_or_add_paths():
    """"-NAME" relaxes a built-in entry; anything else is an extra read-only path."""
    from gvisor_magic.protected import PathPolicy

    policy = PathPolicy.parse(["-.bashrc", "data/raw", "/abs/x"])
    assert policy.relaxed == (".bashrc",)
    assert policy.extra == ("data/raw", "/abs/x")
    empty = PathPolicy()
    assert tuple(empty.relaxed) == () and tuple(empty.extra) == ()


def test_policy_from_the_environment(monkeypatch):
    """GVISOR_MAGIC_PROTECTED_PATHS holds ":"-separated entries; unset means the defaults."""
    from gvisor_magic.protected import PathPolicy

    monkeypatch.setenv("GVISOR_MAGIC_PROTECTED_PATHS", "-.vscode:data/raw:/srv/shared")
    policy = PathPolicy.from_env()
    assert policy.relaxed == (".vscode",)
    assert policy.extra == ("data/raw", "/srv/shared")
    monkeypatch.delenv("GVISOR_MAGIC_PROTECTED_PATHS")
    unset = PathPolicy.from_env()
    assert tuple(unset.relaxed) == () and tuple(unset.extra) == ()


@pytest.mark.parametrize("entry", ["", "-", "data/\0raw", "-.bash\0rc"],
                         ids=["empty", "bare-dash", "nul", "nul-relax"])
def test_bad_policy_entries_are_refused(entry):
    """An empty entry, a lone "-" or a NUL byte is a mistake, refused before anything runs."""
    from gvisor_magic.errors import InvalidRequestError
    from gvisor_magic.protected import PathPolicy

    with pytest.raises(InvalidRequestError):
        PathPolicy.parse([entry])


# -- plan_protection --------------------------------------------------------------------------


def test_plan_shapes(home):
    """Every planned protection says what, how, whether it exists, its kind and why."""
    from gvisor_magic.protected import Protection

    plan = plan_for(home)
    assert isinstance(plan.complete, bool)
    assert plan.protections, "a home with rc files and a repo must be protected"
    for protection in plan.protections:
        assert isinstance(protection, Protection)
        assert protection.action in {"read-only", "hidden"}, protection
        assert protection.kind in {"file", "dir"}, protection
        assert isinstance(protection.exists, bool), protection
        assert isinstance(protection.why, str) and protection.why.strip(), protection
        assert os.path.isabs(os.fspath(protection.path)), protection


def test_home_config_that_runs_is_read_only(home):
    """An existing ~/.bashrc is mounted read-only; a missing ~/.ipython gets a stand-in."""
    plan = protections_by_path(plan_for(home))
    bashrc = plan[str(home / ".bashrc")]
    assert (bashrc.action, bashrc.kind, bashrc.exists) == ("read-only", "file", True)
    ipython = plan[str(home / ".ipython")]
    assert (ipython.action, ipython.kind, ipython.exists) == ("read-only", "dir", False)


def test_git_control_files_are_read_only(home):
    """A repo's .git/config and .git/hooks cannot be rewritten from inside."""
    plan = protections_by_path(plan_for(home))
    assert plan[str(home / "proj" / ".git" / "config")].action == "read-only"
    assert plan[str(home / "proj" / ".git" / "hooks")].action == "read-only"
    assert plan[str(home / "proj" / ".git" / "hooks")].kind == "dir"


def test_secrets_at_depth_are_hidden(home):
    """A nested .ssh, .env and .env.* and Jupyter's runtime dir are hidden; .env.example is
    not a secret."""
    plan = protections_by_path(plan_for(home))
    assert plan[str(home / "a" / "b" / ".ssh")].action == "hidden"
    assert plan[str(home / "sub" / ".env")].action == "hidden"
    assert plan[str(home / "sub" / ".env.local")].action == "hidden"
    runtime = home / ".local" / "share" / "jupyter" / "runtime"
    assert plan[str(runtime)].action == "hidden"
    example = str(home / "sub" / ".env.example")
    assert example not in plan or plan[example].action != "hidden"


def test_a_symlinked_ssh_inside_the_mount_hides_its_target(tmp_path):
    """~/.ssh -> dotfiles/ssh (stow): what is hidden is the real folder."""
    home = tmp_path / "home"
    (home / "dotfiles" / "ssh").mkdir(parents=True)
    (home / "dotfiles" / "ssh" / "id_ed25519").write_text("KEY\n")
    (home / ".ssh").symlink_to("dotfiles/ssh")
    plan = protections_by_path(plan_for(home))
    target = os.path.realpath(home / "dotfiles" / "ssh")
    assert target in plan, sorted(plan)
    assert plan[target].action == "hidden"
    assert plan[target].kind == "dir"


def test_a_symlinked_ssh_pointing_outside_the_mount_is_not_planned(tmp_path):
    """A link whose target is not mounted needs nothing: nothing to hide, nothing to mount."""
    home, outside = tmp_path / "home", tmp_path / "outside-ssh"
    home.mkdir()
    outside.mkdir()
    (outside / "id_ed25519").write_text("KEY\n")
    (home / ".ssh").symlink_to(outside)
    plan = protections_by_path(plan_for(home))
    assert str(home / ".ssh") not in plan, plan.get(str(home / ".ssh"))
    assert os.path.realpath(outside) not in plan
    assert not any(path.startswith(str(outside)) for path in plan), sorted(plan)


def test_relaxing_and_extending(home):
    """"-.bashrc" drops ~/.bashrc from the plan; "data/raw" adds that folder read-only."""
    from gvisor_magic.protected import PathPolicy

    relaxed = protections_by_path(plan_for(home, PathPolicy.parse(["-.bashrc"])))
    assert str(home / ".bashrc") not in relaxed
    assert str(home / ".profile") in relaxed, "only the named entry is relaxed"
    extended = protections_by_path(plan_for(home, PathPolicy.parse(["data/raw"])))
    raw = extended[str(home / "data" / "raw")]
    assert (raw.action, raw.kind, raw.exists) == ("read-only", "dir", True)


# -- scrub_config_text ------------------------------------------------------------------------


def test_scrubbing_a_git_config():
    """Credentials in URLs and auth headers are removed; the URL itself stays usable."""
    from gvisor_magic.protected import scrub_config_text

    text = ('[remote "o"]\n\turl = https://u:tok@host/x.git\n'
            "[http]\n\textraheader = AUTHORIZATION: bearer tok\n")
    scrubbed = scrub_config_text(text)
    assert "tok" not in scrubbed
    assert "https://host/x.git" in scrubbed
    assert '[remote "o"]' in scrubbed


def test_scrubbing_pip_and_npm_config():
    """pip.conf keeps its index without the password; .npmrc loses its auth token; harmless
    lines stay."""
    from gvisor_magic.protected import scrub_config_text

    pip = scrub_config_text("[global]\nindex-url = https://u:p@mirror/simple\ntimeout = 60\n")
    assert "https://mirror/simple" in pip
    assert "u:p@" not in pip
    assert "timeout = 60" in pip
    npm = scrub_config_text("registry=https://registry.example/\n//registry/:_authToken=abc\n")
    assert "abc" not in npm and "_authToken" not in npm
    assert "registry=https://registry.example/" in npm
    harmless = "[core]\n\teditor = vim\n"
    assert "\teditor = vim" in scrub_config_text(harmless)


def test_scrubbing_tokens_in_urls():
    """A conda channel's /t/<token> segment, credential query parameters and userinfo go;
    the channel, the index and harmless parameters stay."""
    from gvisor_magic.protected import scrub_config_text

    condarc = scrub_config_text(
        "channels:\n  - https://conda.anaconda.org/t/tk-SECRET1/chan\n  - defaults\n"
        "channel_alias: https://conda.anaconda.org/t/SECRET2\n"
        "custom_channels: [https://u:SECRET3@h.example/t/SECRET4/x, 'https://h/t/SECRET5']\n")
    assert "SECRET" not in condarc
    assert "https://conda.anaconda.org/chan" in condarc
    assert "channel_alias: https://conda.anaconda.org\n" in condarc
    assert "  - defaults\n" in condarc
    pip = scrub_config_text("[global]\nindex-url = https://h/simple?token=SECRET6\n"
                            "extra-index-url = https://h/s/?page=2&access_token=SECRET7&x=1\n"
                            "find-links = https://h/f?sig=SECRET8#frag\n")
    assert "SECRET" not in pip
    assert "index-url = https://h/simple\n" in pip
    assert "https://h/s/?page=2&x=1" in pip
    assert "https://h/f#frag" in pip
    assert scrub_config_text("keep = https://h/p?page=2\n") == "keep = https://h/p?page=2\n"
    yarn = scrub_config_text('registry "https://r.example/"\n'
                             '"//r.example/:_authToken" SECRET9\n')
    assert "SECRET" not in yarn and 'registry "https://r.example/"' in yarn


def test_every_scrubbed_name_is_scanned_for_tokens(tmp_path):
    """Each scrubbed file name holding a /t/<token> URL is planned as a scrubbed copy."""
    from gvisor_magic.protected import SCRUBBED, SCRUBBED_NAMES

    for name in SCRUBBED_NAMES:
        (tmp_path / name).write_text("url: https://conda.anaconda.org/t/SECRET/chan\n")
    plan = plan_for(tmp_path)
    scrubbed = {os.path.basename(p.path): p for p in plan.protections if p.action == SCRUBBED}
    assert set(scrubbed) == set(SCRUBBED_NAMES) and {".yarnrc", ".condarc"} <= set(scrubbed)
    assert all("SECRET" not in p.text for p in scrubbed.values())


# -- what a git config makes git run ----------------------------------------------------------

#: One entry per class of git-config(1) key that names a program, a command or a file
#: of more configuration, as a user (or a command) would write it.
GIT_RUNS = {
    "core.fsmonitor": "[core]\n\tfsmonitor = x", "core.hookspath": "[core]\nhooksPath = h",
    "core.sshcommand": "[core]\n\tsshCommand = x", "core.editor": "[core]\n\teditor = x",
    "core.pager": "[core]\n\tpager = x", "core.askpass": "[core]\n\taskPass = x",
    "core.gitproxy": "[core]\n\tgitProxy = x",
    "core.alternaterefscommand": "[core]\n\talternateRefsCommand = x",
    "credential.helper": "[credential]\n\thelper = x",
    "credential.https://h.helper": '[credential "https://h"]\n\thelper = x',
    "gpg.program": "[gpg]\n\tprogram = x", "gpg.ssh.program": '[gpg "ssh"]\n\tprogram = x',
    "gpg.x509.program": "[gpg.x509]\n\tprogram = x",
    "gpg.ssh.defaultkeycommand": '[gpg "ssh"]\n\tdefaultKeyCommand = x',
    "diff.d.textconv": '[diff "d"]\n\ttextconv = x', "diff.external": "[diff]\nexternal = x",
    "diff.d.command": '[diff "d"]\n\tcommand = x', "merge.m.driver": '[merge "m"]\ndriver = x',
    "filter.f.clean": '[filter "f"]\n\tclean = x', "filter.f.smudge": '[filter "f"]\nsmudge=x',
    "filter.f.process": '[filter "f"]\n\tprocess = x',
    "trailer.t.command": '[trailer "t"]\n\tcommand = x', "trailer.t.cmd": '[trailer "t"]\ncmd=x',
    "sequence.editor": "[sequence]\n\teditor = x", "alias.st": "[alias]\n\tst = !sh -c x",
    "include.path": "[include]\n\tpath = f",
    "includeif.gitdir:/.path": '[includeIf "gitdir:/"]\n\tpath = f',
    "uploadpack.packobjectshook": "[uploadpack]\n\tpackObjectsHook = x",
    "remote.o.uploadpack": '[remote "o"]\n\tuploadpack = x',
    "remote.o.receivepack": '[remote "o"]\n\treceivepack = x',
    "remote.o.vcs": '[remote "o"]\n\tvcs = x', "remote.o.url": '[remote "o"]\nurl = ext::sh x',
    "url.ext::sh x.insteadof": '[url "ext::sh x"]\n\tinsteadOf = https://h/',
    "protocol.ext.allow": '[protocol "ext"]\n\tallow = always',
    "submodule.s.update": '[submodule "s"]\n\tupdate = !x', "pager.log": "[pager]\n\tlog = x",
    "interactive.difffilter": "[interactive]\n\tdiffFilter = x",
    "difftool.t.cmd": '[difftool "t"]\n\tcmd = x', "mergetool.t.path": '[mergetool "t"]\npath=x',
    "tar.tgz.command": '[tar "tgz"]\n\tcommand = x', "imap.tunnel": "[imap]\n\ttunnel = x",
    "sendemail.smtpserver": "[sendemail]\n\tsmtpServer = /bin/x",
    "web.browser": "[web]\n\tbrowser = x", "browser.b.cmd": '[browser "b"]\n\tcmd = x',
    "man.m.cmd": '[man "m"]\n\tcmd = x', "init.templatedir": "[init]\n\ttemplateDir = t",
    "hook.h.command": '[hook "h"]\n\tcommand = x',
    "lfs.customtransfer.a.path": '[lfs "customtransfer.a"]\n\tpath = x',
}


@pytest.mark.parametrize("key", sorted(GIT_RUNS))
def test_git_config_keys_that_run_programs_are_found(key, tmp_path):
    """Each key is found by the forgiving reader, and as git itself reads the file."""
    from gvisor_magic.postrun import _git_exec_keys, git_config_runs_programs

    text = GIT_RUNS[key] + "\n"
    assert key in [k.lower() for k in git_config_runs_programs(text)], text
    assert key in [k.lower() for k in git_config_runs_programs("\ufeff" + text)], "after a BOM"
    config = tmp_path / "config"
    config.write_text(text)
    assert key.lower() in [k.lower() for k in _git_exec_keys(str(config))]


def test_an_ordinary_clone_config_runs_nothing():
    """What git init/clone/submodule write, and user settings, are not flagged."""
    from gvisor_magic.postrun import git_config_runs_programs

    text = ("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
            "\tlogallrefupdates = true\n"
            '[remote "origin"]\n\turl = https://git.example.invalid/x.git\n'
            "\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
            '[branch "main"]\n\tremote = origin\n\tmerge = refs/heads/main\n'
            '[submodule "lib"]\n\turl = https://git.example.invalid/lib.git\n\tactive = true\n'
            "[user]\n\tname = U\n\temail = u@example.invalid\n[commit]\n\tgpgsign = false\n")
    assert git_config_runs_programs(text) == []


# -- bytecode ---------------------------------------------------------------------------------


def test_bytecode_python_would_run_is_quarantined(tmp_path, monkeypatch):
    """Sourceless .pyc/.pyo and cached bytecode that is not what its source compiles to are
    moved; faithful cached bytecode, and cached bytecode with no source, stay."""
    import importlib._bootstrap_external as external
    import importlib.machinery
    import importlib.util
    import subprocess
    import sys
    import time

    from gvisor_magic.postrun import check_after_run

    work, quarantine = tmp_path / "work", tmp_path / "quarantine"
    (work / "pkg").mkdir(parents=True)
    monkeypatch.setenv("GVISOR_MAGIC_QUARANTINE_DIR", str(quarantine))
    for name in ("faithful", "planted", "unchecked", "other"):
        (work / f"{name}.py").write_text(f"NAME = {name!r}\n")
    since = time.time()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import faithful"], cwd=work, env=env, check=True)
    evil = compile("raise SystemExit('planted')", "x", "exec")

    def cache(name: str, data: bytes, suffix: str = "") -> Path:
        path = Path(importlib.util.cache_from_source(str(work / f"{name}.py")) + suffix)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path

    info = (work / "planted.py").stat()
    planted = cache("planted", external._code_to_timestamp_pyc(evil, int(info.st_mtime),
                                                               info.st_size))
    unchecked = cache("unchecked", external._code_to_hash_pyc(evil, b"\0" * 8, checked=False))
    tag = sys.implementation.cache_tag
    other = work / "__pycache__" / f"other.{tag}-pytest-9.2.0.pyc"
    other.write_bytes(b"x" * 20)
    orphan = work / "__pycache__" / f"gone.{tag}.pyc"
    orphan.write_bytes(b"x" * 20)
    sourceless = [work / "json.pyc", work / "pkg" / "__init__.pyc", work / "old.pyo"]
    for path in sourceless:
        path.write_bytes(external._code_to_timestamp_pyc(evil, 0, 0))
    # An extension module beside a source wins over it; one with no source beside is a build.
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    beside, built = work / f"planted{suffix}", work / f"cythonized{suffix}"
    beside.write_bytes(b"\x7fELF")
    built.write_bytes(b"\x7fELF")
    faithful = Path(importlib.util.cache_from_source(str(work / "faithful.py")))
    assert faithful.exists()
    # Compiled elsewhere, then moved in (pip's --target install): still what it compiles to.
    build = tmp_path / "build"
    build.mkdir()
    (build / "moved.py").write_text("def f():\n    return 1\n")
    subprocess.run([sys.executable, "-m", "compileall", "-q", "build"], cwd=tmp_path, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    (build / "moved.py").rename(work / "moved.py")
    moved_cache = Path(importlib.util.cache_from_source(str(work / "moved.py")))
    Path(importlib.util.cache_from_source(str(build / "moved.py"))).rename(moved_cache)

    details = check_after_run(str(work), since, cwd=str(tmp_path))
    moved = details.get("quarantined", "")
    for path in [planted, unchecked, other, *sourceless, beside]:
        assert not path.exists() and str(path) in moved, (path, moved)
    assert faithful.exists() and str(faithful) not in moved
    assert moved_cache.exists() and str(moved_cache) not in moved
    assert built.exists() and str(built) not in moved
    assert orphan.exists(), "bytecode without a source is never loaded"
    assert all((work / f"{n}.py").exists() for n in ("faithful", "planted", "unchecked"))


# -- /etc/ssl --------------------------------------------------------------------------------


def test_etc_ssl_shows_certificates_and_never_keys(tmp_path):
    """Of a Debian-style /etc/ssl: certs/ bound, OpenSSL's configuration and certificates
    copied, private/ (a dir or a link) and any PEM private key left out or hidden."""
    from gvisor_magic.backends.layout import _copy_without, _private_keys_in, _write_etc_ssl

    key = "-----BEGIN PRIVATE KEY-----\nSECRET\n-----END PRIVATE KEY-----\n"
    cert = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n"
    ssl = tmp_path / "ssl"
    (ssl / "certs" / "java").mkdir(parents=True)
    (ssl / "private").mkdir()
    (ssl / "private" / "server.key").write_text(key)
    (ssl / "certs" / "ca-certificates.crt").write_text(cert)
    (ssl / "certs" / "server.pem").write_text(cert + key)
    (ssl / "certs" / "java" / "inner.pem").write_text(key)
    (ssl / "certs" / "abcd1234.0").symlink_to("/usr/share/ca-certificates/x.crt")
    (ssl / "openssl.cnf").write_text("[openssl_init]\n")
    (ssl / "cert.pem").write_text(cert)
    (ssl / "top.pem").write_text(key)
    (ssl / "misc").mkdir()
    target = tmp_path / "etc" / "ssl"

    binds = _write_etc_ssl(str(ssl), str(target))
    assert binds == [str(ssl / "certs")]
    assert sorted(os.listdir(target)) == ["cert.pem", "certs", "openssl.cnf"]
    keys = _private_keys_in(str(ssl / "certs"))
    assert sorted(keys) == [str(ssl / "certs" / "java" / "inner.pem"),
                            str(ssl / "certs" / "server.pem")]
    # A dir holding keys is copied (never a mount over a host file): keys empty, links kept.
    copy = tmp_path / "copy"
    _copy_without(str(ssl / "certs"), str(copy), set(keys))
    assert (copy / "server.pem").read_text() == "" == (copy / "java" / "inner.pem").read_text()
    assert (copy / "ca-certificates.crt").read_text() == cert
    assert os.readlink(copy / "abcd1234.0") == "/usr/share/ca-certificates/x.crt"

    linked, linked_target = tmp_path / "ssl2", tmp_path / "etc2" / "ssl"
    linked.mkdir()
    (linked / "private").symlink_to(ssl / "private")
    assert _write_etc_ssl(str(linked), str(linked_target)) == []
    assert os.listdir(linked_target) == []


# -- the environment allowlist ----------------------------------------------------------------


def test_only_real_locale_variables_pass(monkeypatch):
    """LC_ALL and friends reach the sandbox; a host variable merely named LC_* does not."""
    from gvisor_magic.request import sandbox_env

    monkeypatch.setenv("LC_AUDIT_TOKEN", "CANARY-lc-token")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("LC_TIME", "en_GB.UTF-8")
    monkeypatch.setenv("TZ", "Europe/Paris")
    env = sandbox_env({}, home="/tmp/home", path="/usr/bin:/bin", user="u")
    assert "LC_AUDIT_TOKEN" not in env
    assert "CANARY-lc-token" not in env.values()
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["LC_TIME"] == "en_GB.UTF-8"
    assert env["TZ"] == "Europe/Paris"


def test_scrubbed_etc_files_are_named_in_the_details(tmp_path):
    """A host /etc file shown without its credentials is named in ``details["scrubbed"]``,
    beside the working dir's; one with nothing to strip is not."""
    from gvisor_magic.backends.layout import caller_identity, write_etc
    from gvisor_magic.protected import ProtectionPlan, protection_details

    host_etc = tmp_path / "host-etc"
    host_etc.mkdir()
    (host_etc / "pip.conf").write_text(
        "[global]\nindex-url = https://user:s3cret-canary@mirror.example/simple\n")
    (host_etc / "gitconfig").write_text("[user]\n\tname = someone\n")
    scrubbed: list[str] = []
    write_etc(str(tmp_path / "etc"), caller_identity(), False, "box", scrubbed=scrubbed,
              host_etc=str(host_etc))
    assert scrubbed == ["/etc/pip.conf"]
    assert "s3cret-canary" not in (tmp_path / "etc" / "pip.conf").read_text()
    assert protection_details(ProtectionPlan(), scrubbed)["scrubbed"] == "/etc/pip.conf"
