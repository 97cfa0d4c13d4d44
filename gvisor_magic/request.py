"""Validated description of one command to run: the edge where bad input stops.

Everything a backend needs is checked and normalised here, before any backend
is chosen or any process started, so every backend can trust its input and
every mistake gets one precise message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import registry
from .egress.policy import NetworkPolicy, PolicyError
from .errors import InvalidRequestError
from .protected import PathPolicy, ProtectionPlan
from .registry import Enforcement


class _Modes:
    """``auto`` and every backend of the registry, read afresh whenever asked: what
    ``mode=`` takes, usable as argparse ``choices`` and in ``in`` tests."""

    def __iter__(self):
        return iter(valid_modes())

    def __contains__(self, value: object) -> bool:
        return value in valid_modes()

    def __len__(self) -> int:
        return len(valid_modes())

    def __getitem__(self, index: int) -> str:
        return valid_modes()[index]

    def __repr__(self) -> str:
        return repr(valid_modes())


MODES = _Modes()
ENV_MODE = "GVISOR_MAGIC_MODE"
ENV_REQUIRE = "GVISOR_MAGIC_REQUIRE_ISOLATION"
#: ``0``/``off`` stops one-shot calls from reusing warm sandboxes (on by default).
ENV_REUSE = "GVISOR_MAGIC_REUSE"

DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024
DEFAULT_SHELL = "/bin/sh"
#: The values of ``writes``: the command's writes land as made, are all held for review,
#: or land unless a host tool would run or load them (``gvisor_magic.activity``).
WRITES = ("direct", "review", "auto")
#: ``writes`` when not given: held where a sandbox can hold them (see ``holds_writes``).
DEFAULT_WRITES = "auto"
#: What ``network=`` takes (see ``check_network``).
NetworkSetting = bool | str | Sequence[str] | NetworkPolicy

# Host variables worth keeping: they change how text is rendered, never what a
# command may access. Everything else (tokens, cloud keys, proxies) stays out.
# Exact names: a prefix such as ``LC_`` would let ``LC_AUDIT_TOKEN`` in.
ENV_ALLOWLIST = frozenset({
    "LANG", "LANGUAGE", "TZ", "TERM", "LC_ALL", "LC_CTYPE", "LC_COLLATE", "LC_MESSAGES",
    "LC_NUMERIC", "LC_TIME", "LC_MONETARY", "LC_PAPER", "LC_NAME", "LC_ADDRESS",
    "LC_TELEPHONE", "LC_MEASUREMENT", "LC_IDENTIFICATION"})

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Host directories that must never be mounted read-write over the sandbox.
_FORBIDDEN_MOUNT_ROOTS = ("/proc", "/sys", "/dev")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every sandboxed command.

    Under gVisor they are rlimits enforced by gVisor's own kernel, so they hold
    without host cgroups (inside an unprivileged pod, for an ordinary user).
    ``None`` means "no limit" for that resource.
    """

    max_processes: int | None = 512
    max_open_files: int | None = 4096
    max_file_size: int | None = 4 * GiB
    max_address_space: int | None = 16 * GiB
    tmp_size: int = 512 * MiB
    #: cgroup limits: applied where the backend has cgroups (Docker).
    memory: int | None = 4 * GiB
    cpus: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_processes", "max_open_files", "max_file_size", "max_address_space",
                     "memory"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise InvalidRequestError(f"limits.{name} must be a positive int or None, "
                                          f"got {value!r}")
        if isinstance(self.tmp_size, bool) or not isinstance(self.tmp_size, int) \
                or self.tmp_size <= 0:
            raise InvalidRequestError(f"limits.tmp_size must be a positive int, "
                                      f"got {self.tmp_size!r}")

        if self.cpus is not None and (isinstance(self.cpus, bool)
                                      or not isinstance(self.cpus, (int, float))
                                      or not 0 < self.cpus < 1024):
            raise InvalidRequestError(f"limits.cpus must be a positive number or None, "
                                      f"got {self.cpus!r}")

    @classmethod
    def parse(cls, values: Mapping[str, object], base: Limits | None = None) -> Limits:
        """Limits from user text: ``{"memory": "2G", "max_processes": "100", "cpus": "none"}``.

        Sizes take a K/M/G/T suffix (powers of 1024); ``none`` means no limit.
        Unknown names and bad values raise ``InvalidRequestError``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, object] = {}
        for name, raw in values.items():
            if name not in names:
                raise InvalidRequestError(f"unknown limit {name!r}: expected one of "
                                          f"{', '.join(sorted(names))}")
            changes[name] = _parse_limit(name, raw)
        return dataclasses.replace(base or cls(), **changes)

    def describe(self, enforced: Mapping[str, Enforcement] | None = None) -> str:
        """One line, e.g. ``processes 512, ..., memory 4 GiB (host cgroup), cpus unlimited``.

        ``enforced`` maps backend names to their ``Enforcement``: with one entry, memory
        and cpus say what bounds them there (or "NOT enforced"); with several, where
        each backend differs (``registry.enforcement`` builds it).
        """
        def size(value: int | None) -> str:
            if value is None:
                return "unlimited"
            for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
                if value % factor == 0:
                    return f"{value // factor} {unit}"
            return f"{value} B"

        def how_bounded(limit: str) -> str:
            if not enforced:
                return "enforcement depends on the backend"
            if len(enforced) == 1:
                return getattr(next(iter(enforced.values())), limit)
            return "; ".join(f"{name}: {getattr(e, limit)}" for name, e in enforced.items())

        how = {limit: how_bounded(limit) for limit in ("memory", "cpus")}
        count = {None: "unlimited"}
        memory = size(self.memory) + (f" ({how['memory']})" if self.memory is not None else "")
        cpus = "unlimited" if self.cpus is None else f"{self.cpus:g} ({how['cpus']})"
        return (f"processes {count.get(self.max_processes, self.max_processes)}, "
                f"open files {count.get(self.max_open_files, self.max_open_files)}, "
                f"file size {size(self.max_file_size)}, "
                f"address space {size(self.max_address_space)}, /tmp and HOME "
                f"{size(self.tmp_size)} each, memory {memory}, cpus {cpus}")

    def rlimits(self) -> dict[str, int]:
        """The limits as ``RLIMIT_*`` names, the vocabulary OCI and ``resource`` share."""
        table = {
            "RLIMIT_NPROC": self.max_processes,
            "RLIMIT_NOFILE": self.max_open_files,
            "RLIMIT_FSIZE": self.max_file_size,
            "RLIMIT_AS": self.max_address_space,
        }
        return {name: value for name, value in table.items() if value is not None}


def _parse_limit(name: str, raw: object) -> object:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "unlimited")):
        if name == "tmp_size":
            raise InvalidRequestError("limits.tmp_size cannot be unlimited")
        return None
    if name == "cpus":
        try:
            return float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidRequestError(f"limits.cpus must be a number, got {raw!r}") from None
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    text = str(raw).strip().upper().removesuffix("IB").removesuffix("B")
    factor = 1
    if text[-1:] in _SIZE_SUFFIXES:
        factor, text = _SIZE_SUFFIXES[text[-1]], text[:-1]
    try:
        return int(float(text) * factor)
    except ValueError:
        raise InvalidRequestError(f"limits.{name}: cannot read {raw!r} (use e.g. 512, 2G, "
                                  "none)") from None


_SIZE_SUFFIXES = {"K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}


@dataclass(frozen=True)
class SandboxSpec:
    """What a sandbox is made of, fixed when it starts: the working dir (read-write) and
    repo (read-only) it mounts, network, limits, protected paths, and the shell a script
    runs with. Hashable: a warm sandbox serves exactly one spec.

    Every face makes it with ``from_options`` (the API's ``build``, the magics, the CLI, the
    kernelspec); ``to_json``/``from_json`` carry it to another process (a kernel's
    launcher), which checks it again."""

    working_dir: str | None = None
    repo_path: str | None = None
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    limits: Limits = field(default_factory=Limits)
    #: The user's changes to the protected-paths policy (``gvisor_magic.protected``).
    protection: PathPolicy = field(default_factory=PathPolicy)
    shell: str = DEFAULT_SHELL
    #: A host dir mounted read-write at its own path in which the sandbox may create Unix
    #: sockets the host connects to (a gVisor kernel's ZMQ sockets); runsc only.
    kernel_dir: str | None = None
    #: Host dirs of the caller's PYTHONPATH, mounted read-only at their own paths, so a
    #: Python started inside imports what the caller imports (a gVisor kernel's ipykernel).
    python_path: tuple[str, ...] = ()
    #: The sandbox's host name (``hostname``, ``/etc/hostname``, ``$HOSTNAME``).
    hostname: str = "gvisor-sandbox"
    #: What happens to the command's writes to the working dir (``WRITES``): "direct"
    #: (they land as made), "review" (all held), "auto" (inert ones land, active ones held).
    #: None: not given, ``DEFAULT_WRITES`` where writes can be held, and direct where they
    #: cannot (the subprocess backend, an image of one's own), which the result then says;
    #: given, it is never weakened (``review``/``auto`` are refused there). A gVisor kernel
    #: holds them per cell (``kernel/cells.py``).
    writes: str | None = None
    #: The plan made for its mounts just before it starts (host state, not input).
    plan: ProtectionPlan | None = field(default=None, compare=False, repr=False)

    @property
    def writes_mode(self) -> str:
        """``writes``, or the default when it was not given."""
        return self.writes or DEFAULT_WRITES

    @property
    def holds_writes(self) -> bool:
        """Whether the command's writes to the working dir go to a copy-on-write layer: a
        working dir and a mode other than direct."""
        return self.writes_mode != "direct" and self.working_dir is not None

    @classmethod
    def build(
        cls,
        working_dir: str | os.PathLike[str] | None = None,
        repo_path: str | os.PathLike[str] | None = None,
        *,
        network: NetworkSetting = False,
        limits: Limits | None = None,
        shell: str = DEFAULT_SHELL,
        protected_paths: Sequence[str] | PathPolicy | None = None,
        kernel_dir: str | os.PathLike[str] | None = None,
        python_path: Sequence[str] = (),
        writes: str | None = None,
    ) -> SandboxSpec:
        """The API's face of ``from_options``: typed keywords, ``limits`` a ``Limits``."""
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a gvisor_magic.Limits, got {type(limits).__name__}")
        return cls.from_options({
            "working_dir": working_dir, "repo_path": repo_path, "network": network,
            "limits": limits, "shell": shell, "protected_paths": protected_paths,
            "kernel_dir": kernel_dir, "python_path": python_path, "writes": writes})

    @classmethod
    def from_options(cls, options: Mapping[str, object],
                     base: SandboxSpec | None = None) -> SandboxSpec:
        """The sandbox ``options`` describe, over ``base`` (else the defaults): the one
        reader of sandbox settings, given as user text (``"2G"``, ``"pypi"``,
        ``["memory=1G"]``) or typed (``True``, ``Limits``, ``NetworkPolicy``, ``PathPolicy``).

        The names are ``SPEC_OPTIONS``, as ``%config Isolation.<name>``, the kernelspec's
        config and ``build`` spell them. A value of None is not given: ``base``'s stands.
        A given value replaces ``base``'s, but for two: ``limits`` change the limits they
        name (a mapping, or ``NAME=VALUE`` strings; a ``Limits`` replaces them all), and
        ``allow_hosts`` are added to the network (``NetworkPolicy.combined``: an allowlist
        grows, off becomes one, public keeps the public internet). A bad value raises
        ``InvalidRequestError`` (``TypeError`` for a value of the wrong kind).
        """
        if not isinstance(options, Mapping):
            raise TypeError(f"sandbox options must be a mapping, got {type(options).__name__}")
        for name in options:
            if name not in SPEC_OPTIONS:
                raise InvalidRequestError(f"unknown sandbox setting {name!r}: expected one "
                                          f"of {', '.join(SPEC_OPTIONS)}")
        given = {name: value for name, value in options.items() if value is not None}
        spec = base or cls()
        changes: dict[str, object] = {"plan": None}
        for name in ("working_dir", "repo_path", "kernel_dir"):
            if name in given:
                changes[name] = _check_dir(given[name], name)
        network = check_network(given["network"]) if "network" in given else spec.network
        changes["network"] = _allow_hosts(network, given.get("allow_hosts") or ())
        if "limits" in given:
            changes["limits"] = _check_limits(given["limits"], spec.limits)
        if "protected_paths" in given:
            rules = given["protected_paths"]
            changes["protection"] = rules if isinstance(rules, PathPolicy) \
                else PathPolicy.parse(rules)  # type: ignore[arg-type]
        if "shell" in given:
            shell = given["shell"]
            if not isinstance(shell, str) or not shell:
                raise InvalidRequestError(f"shell must be a program name or path, got {shell!r}")
            changes["shell"] = shell
        if "python_path" in given:
            changes["python_path"] = _check_dirs(given["python_path"], "python_path")
        if "hostname" in given:
            changes["hostname"] = _check_hostname(given["hostname"])
        if "writes" in given:
            changes["writes"] = _check_writes(given["writes"])
        return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]

    def to_options(self) -> dict[str, object]:
        """Every setting but ``plan`` (host state), as ``from_options`` reads them back:
        plain JSON values."""
        entries = _allow_entries(self.network)
        network: object = {"off": False, "host": "host", "public": True}.get(
            self.network.mode, entries)
        return {
            "working_dir": self.working_dir, "repo_path": self.repo_path,
            "network": network, "allow_hosts": entries if self.network.mode == "public" else [],
            "limits": dataclasses.asdict(self.limits),
            "protected_paths": [*(("+" + name) if name.startswith(("+", "-")) else name
                                  for name in self.protection.extra),
                                *("-" + name for name in self.protection.relaxed)],
            "shell": self.shell, "kernel_dir": self.kernel_dir,
            "python_path": list(self.python_path), "hostname": self.hostname,
            "writes": self.writes}

    def to_json(self) -> str:
        """``to_options`` as JSON: ``from_json`` reads it back, checking it again."""
        return json.dumps(self.to_options(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> SandboxSpec:
        """The spec ``to_json`` wrote, checked again (its dirs must exist here, now)."""
        try:
            options = json.loads(text)
        except ValueError as exc:
            raise InvalidRequestError(f"a sandbox spec must be JSON: {exc}") from None
        if not isinstance(options, dict):
            raise InvalidRequestError("a sandbox spec must be a JSON object of settings, "
                                      f"got {type(options).__name__}")
        return cls.from_options(options)


#: The sandbox settings ``run_command_isolated`` and ``IsolatedSession`` also take one by
#: one, as keywords: the spelling before ``spec=``, kept as a thin shim (``resolve_spec``).
SANDBOX_KEYWORDS = ("working_dir", "repo_path", "network", "limits", "shell", "protected_paths",
                    "writes")


def resolve_spec(spec: SandboxSpec | str | os.PathLike[str] | None,
                 keywords: Mapping[str, object], *,
                 default_working_dir: str | None = None) -> SandboxSpec:
    """The sandbox a call asks for: ``spec``, or its settings given as ``keywords`` (the
    older spelling, read by ``SandboxSpec.build``), never both. A path where ``spec`` goes
    is the older positional ``working_dir``. None values are not given; a spec without
    a working dir gets ``default_working_dir`` (a session's: the current directory)."""
    given = {name: value for name, value in keywords.items() if value is not None}
    unknown = set(given) - set(SANDBOX_KEYWORDS)
    if unknown:
        raise TypeError(f"unknown sandbox keyword(s) {', '.join(sorted(unknown))}: expected "
                        f"{', '.join(SANDBOX_KEYWORDS)}, or spec=SandboxSpec(...)")
    if isinstance(spec, (str, os.PathLike)):
        if "working_dir" in given:
            raise TypeError("working_dir was given twice (as the second argument and as "
                            "working_dir=)")
        spec, given = None, {**given, "working_dir": spec}
    if spec is not None:
        if not isinstance(spec, SandboxSpec):
            raise TypeError(f"spec must be a gvisor_magic.SandboxSpec, got "
                            f"{type(spec).__name__}")
        if given:
            raise TypeError(f"give the sandbox as spec= or as keywords, not both (got spec= and "
                            f"{', '.join(sorted(given))}=): to change a spec, use "
                            "SandboxSpec.from_options({...}, base=spec)")
        if spec.working_dir is None and default_working_dir is not None:
            return SandboxSpec.from_options({"working_dir": default_working_dir}, base=spec)
        return dataclasses.replace(spec, plan=None)
    if default_working_dir is not None:
        given.setdefault("working_dir", default_working_dir)
    return SandboxSpec.build(**given)  # type: ignore[arg-type]


#: The names ``SandboxSpec.from_options`` reads.
SPEC_OPTIONS = ("working_dir", "repo_path", "network", "allow_hosts", "limits",
                "protected_paths", "shell", "kernel_dir", "python_path", "hostname",
                "writes")
#: Those every face also takes by name (``--set NAME=VALUE``, ``Isolation.sandbox``, the
#: kernelspec's config): all but where the sandbox is, which each face says in its own way.
NAMED_SETTINGS = tuple(name for name in SPEC_OPTIONS
                       if name not in ("working_dir", "repo_path", "kernel_dir", "python_path"))


def named_settings(pairs: Mapping[str, object], what: str) -> dict[str, object]:
    """``pairs`` (``--set`` values, ``Isolation.sandbox``) checked to name settings of
    ``NAMED_SETTINGS``: the options ``from_options`` then reads."""
    for name in pairs:
        if name not in NAMED_SETTINGS:
            raise InvalidRequestError(f"{what}: unknown sandbox setting {name!r}: expected one "
                                      f"of {', '.join(NAMED_SETTINGS)}")
    return dict(pairs)


def with_named_settings(options: Mapping[str, object]) -> dict[str, object]:
    """``options`` whose ``"sandbox"`` entry (settings by name: a kernelspec's config, the
    CLI's ``--set``) is spread among them, as ``from_options`` reads them; a setting named
    both ways takes its own entry's value."""
    options = dict(options)
    named = options.pop("sandbox", None) or {}
    if not isinstance(named, Mapping):
        raise TypeError(f"sandbox must be a mapping of setting names to values, got "
                        f"{type(named).__name__}")
    return {**named_settings(named, "sandbox"), **options}


def parse_pairs(items: Iterable[str] | str, what: str, *,
                form: str = "KEY=VALUE") -> dict[str, str]:
    """``["A=1", "B= x=y"]`` -> ``{"A": "1", "B": " x=y"}``: the one reader of ``KEY=VALUE``
    text (``--env``, ``--limit``, ``limits=[...]``).

    The key is stripped of the blanks around it; the value is kept as written (a
    variable's value may start or end with a space; the limits' reader strips its own) and
    may hold ``=`` (the first one splits). A key given twice takes its last value, as a
    repeated command-line option does. ``what`` names the option in messages (``--env``),
    ``form`` what it takes.
    """
    pairs: dict[str, str] = {}
    for item in [items] if isinstance(items, str) else items:
        if not isinstance(item, str):
            raise TypeError(f"{what} expects {form} strings, got {item!r}")
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequestError(f"{what} expects {form}, got {item!r}")
        if not key.strip():
            raise InvalidRequestError(f"{what} expects {form}, got {item!r}: the name before "
                                      f"'=' is empty (e.g. {what} {form.split('=')[0]}"
                                      f"{item})")
        pairs[key.strip()] = value
    return pairs


def _allow_hosts(network: NetworkPolicy, hosts: object) -> NetworkPolicy:
    """``allow_hosts``: a list of hosts, or text of them separated by commas or blanks."""
    if isinstance(hosts, str):
        hosts = [word for word in re.split(r"[,\s]+", hosts) if word]
    if not isinstance(hosts, (list, tuple)):
        raise TypeError(f"allow_hosts must be a list of hosts, got {type(hosts).__name__}")
    try:
        return network.combined(hosts)
    except PolicyError as exc:
        raise InvalidRequestError(f"allow_hosts: {exc}") from None


def _allow_entries(network: NetworkPolicy) -> list[str]:
    """What ``NetworkPolicy.allowing`` makes ``network``'s rules from, in their order: a
    preset's name for its rules, each other rule as written."""
    entries: list[str] = []
    for rule in network.rules:
        entry = rule.preset or str(rule)
        if not (rule.preset and entry in entries):
            entries.append(entry)
    return entries


def _check_limits(value: object, base: Limits) -> Limits:
    if isinstance(value, Limits):
        return value
    if isinstance(value, (str, list, tuple)):
        value = parse_pairs(value, "limits", form="NAME=VALUE")
    if not isinstance(value, Mapping):
        raise TypeError("limits must be a mapping, NAME=VALUE strings or a Limits, got "
                        f"{type(value).__name__}")
    return Limits.parse(value, base)


_HOSTNAME = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")


def _check_writes(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"writes must be a str, got {type(value).__name__}")
    if value not in WRITES:
        raise InvalidRequestError(f"writes {value!r} is not one of {', '.join(WRITES)}: "
                                  "'auto' holds back what a host tool would run, 'review' "
                                  "holds everything, 'direct' lets writes land as made")
    return value


def _check_hostname(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"hostname must be a str, got {type(value).__name__}")
    if not _HOSTNAME.match(value):
        raise InvalidRequestError(f"hostname {value!r} is not a host name: 1 to 63 letters, "
                                  "digits and '-', not starting or ending with '-'")
    return value


def _check_dirs(paths: object, name: str) -> tuple[str, ...]:
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        raise TypeError(f"{name} must be a list of directories, got {type(paths).__name__}")
    return tuple(d for d in (_check_dir(p, f"{name} entry") for p in paths) if d)


@dataclass(frozen=True)
class CommandRequest:
    """One command, already validated, and the sandbox it runs in (``spec``)."""

    argv: tuple[str, ...]
    timeout: float | None
    env: Mapping[str, str]
    stdin: bytes | None
    spec: SandboxSpec = field(default_factory=SandboxSpec)
    #: Where it runs, when not in the sandbox's working dir (a warm session's ``cwd``).
    cwd: str | None = None
    max_output: int | None = DEFAULT_MAX_OUTPUT
    #: The text the user asked for, for messages and logs.
    display: str = ""

    @classmethod
    def build(
        cls,
        command: str | Sequence[str],
        spec: SandboxSpec | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        cwd: str | os.PathLike[str] | None = None,
    ) -> CommandRequest:
        """``command`` for the sandbox ``spec`` (the defaults if None), optionally run in
        another ``cwd`` than the sandbox's working dir: the per-command settings checked."""
        if spec is None:
            spec = SandboxSpec()
        argv, display = _check_command(command, spec.shell)
        return cls(
            argv=argv,
            timeout=_check_timeout(timeout),
            env=_check_env(env),
            stdin=_check_stdin(stdin),
            spec=spec,
            cwd=_check_dir(cwd, "cwd"),
            max_output=check_max_output(max_output),
            display=display,
        )

    # The sandbox's settings, as every backend reads them.
    @property
    def working_dir(self) -> str | None:
        """Where the command runs: ``cwd`` if given, else the sandbox's working dir."""
        return self.cwd or self.spec.working_dir

    @property
    def repo_path(self) -> str | None:
        return self.spec.repo_path

    @property
    def network(self) -> NetworkPolicy:
        return self.spec.network

    @property
    def limits(self) -> Limits:
        return self.spec.limits

    @property
    def protection(self) -> PathPolicy:
        return self.spec.protection

    @property
    def plan(self) -> ProtectionPlan | None:
        return self.spec.plan

    def with_spec(self, **changes: object) -> CommandRequest:
        """The same command in a sandbox that differs by ``changes`` (``plan=``, say)."""
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, **changes))


def check_network(value: object) -> NetworkPolicy:
    """``network=``: False, True (public, through the host's filtering proxy), ``"host"``,
    a preset (``"pypi"``), hosts, or a list of them (``gvisor_magic.egress.policy``)."""
    try:
        return NetworkPolicy.parse(value)
    except PolicyError as exc:
        raise InvalidRequestError(f"network: {exc}") from None


def _check_command(command: object, shell: str) -> tuple[tuple[str, ...], str]:
    if isinstance(command, str):
        if not command.strip():
            raise InvalidRequestError("command is empty")
        if "\0" in command:
            raise InvalidRequestError("command contains a NUL byte")
        return (shell, "-c", command), command
    if isinstance(command, (bytes, bytearray)):
        raise TypeError("command must be a str (shell script) or a list of str (argv), not bytes")
    if not isinstance(command, Sequence):
        raise TypeError("command must be a str (shell script) or a list of str (argv), "
                        f"got {type(command).__name__}")
    argv = tuple(command)
    if not argv:
        raise InvalidRequestError("command is empty: give at least the program to run")
    for index, item in enumerate(argv):
        if not isinstance(item, str):
            raise TypeError(f"command[{index}] must be a str, got {type(item).__name__}: {item!r}")
        if "\0" in item:
            raise InvalidRequestError(f"command[{index}] contains a NUL byte")
    if not argv[0]:
        raise InvalidRequestError("command[0] (the program) is an empty string")
    return argv, " ".join(argv)


def _check_dir(path: object, name: str) -> str | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise InvalidRequestError(f"{name} must be a non-empty path")
    if "\0" in text:
        raise InvalidRequestError(f"{name} contains a NUL byte")
    real = os.path.realpath(text)
    if not os.path.exists(real):
        raise InvalidRequestError(f"{name} does not exist: {text}")
    if not os.path.isdir(real):
        raise InvalidRequestError(f"{name} is not a directory: {text}")
    if real == "/":
        raise InvalidRequestError(f"{name} cannot be the root directory '/'")
    for root in _FORBIDDEN_MOUNT_ROOTS:
        if real == root or real.startswith(root + "/"):
            raise InvalidRequestError(f"{name} cannot be inside {root}: {text}")
    return real


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    value = float(timeout)
    if math.isnan(value):
        raise InvalidRequestError("timeout is NaN; give a positive number of seconds or None")
    if math.isinf(value):
        raise InvalidRequestError("timeout is infinite; use None for no time limit")
    if value <= 0:
        raise InvalidRequestError(f"timeout must be > 0 seconds, got {timeout!r}")
    return value


def _check_env(env: object) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, got {type(env).__name__}")
    checked: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str):
            raise TypeError(f"env key must be a str, got {key!r}")
        if not _ENV_KEY.match(key):
            raise InvalidRequestError(
                f"invalid environment variable name {key!r}: use letters, digits and '_', "
                "not starting with a digit")
        if not isinstance(value, str):
            raise TypeError(f"env[{key!r}] must be a str, got {type(value).__name__}")
        if "\0" in value:
            raise InvalidRequestError(f"env[{key!r}] contains a NUL byte")
        checked[key] = value
    return checked


def _check_stdin(stdin: object) -> bytes | None:
    if stdin is None:
        return None
    if isinstance(stdin, str):
        return stdin.encode("utf-8")
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        return bytes(stdin)
    raise TypeError(f"stdin must be str, bytes or None, got {type(stdin).__name__}")


def check_max_output(max_output: object) -> int | None:
    if max_output is None:
        return None
    if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output <= 0:
        raise InvalidRequestError(f"max_output must be a positive number of bytes or None, "
                                  f"got {max_output!r}")
    return max_output


def valid_modes() -> tuple[str, ...]:
    """What ``mode=`` takes: ``auto`` and every backend of the registry."""
    return ("auto", *registry.names())


def resolve_mode(mode: str | None) -> str:
    """The backend mode: the argument, else ``$GVISOR_MAGIC_MODE``, else ``auto``."""
    source = "mode"
    if mode is None:
        mode = os.environ.get(ENV_MODE, "").strip() or "auto"
        source = ENV_MODE
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {type(mode).__name__}")
    value = mode.strip().lower()
    if value not in (modes := valid_modes()):
        raise InvalidRequestError(f"unknown {source} {mode!r}: expected one of {', '.join(modes)}")
    return value


def resolve_require_isolation(require: bool | None) -> bool:
    """The argument, else ``$GVISOR_MAGIC_REQUIRE_ISOLATION``, else False."""
    if require is not None:
        if not isinstance(require, bool):
            raise TypeError(f"require_isolation must be True, False or None, got {require!r}")
        return require
    raw = os.environ.get(ENV_REQUIRE, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidRequestError(f"{ENV_REQUIRE}={raw!r} is not a boolean (use 1/0, true/false)")


def resolve_reuse(reuse: bool | None) -> bool:
    """Whether a one-shot call may reuse a warm sandbox of the same spec: the argument,
    else ``$GVISOR_MAGIC_REUSE``, else True."""
    if reuse is not None:
        if not isinstance(reuse, bool):
            raise TypeError(f"reuse must be True, False or None, got {reuse!r}")
        return reuse
    raw = os.environ.get(ENV_REUSE, "").strip().lower()
    if raw == "" or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidRequestError(f"{ENV_REUSE}={raw!r} is not a boolean (use 1/0, on/off)")


def sandbox_env(given: Mapping[str, str], *, home: str, path: str, user: str) -> dict[str, str]:
    """The environment a sandboxed command sees: an allowlist, never the host's.

    Only locale/terminal variables come from the host; the caller's ``env``
    (``given``) is applied last so it can override anything, including ``PATH``.
    """
    env = {"PATH": path, "HOME": home, "USER": user, "LOGNAME": user, "TMPDIR": "/tmp"}
    for key, value in os.environ.items():
        if key in ENV_ALLOWLIST:
            env[key] = value
    env.setdefault("LANG", "C.UTF-8")
    env.update(given)
    return env
