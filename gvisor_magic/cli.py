"""``gvisor-magic``: ``doctor`` says what works here and why; ``run`` runs one command;
``install`` installs runsc (and registers it with Docker).

``install`` and ``--version`` import nothing beyond the standard library, so they work
before the dependencies do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__, registry
from .errors import CommandInterrupted, GvisorMagicError, IsolationUnavailable
from .request import (
    WRITES,
    Limits,
    SandboxSpec,
    named_settings,
    parse_pairs,
    valid_modes,
    with_named_settings,
)


def _doctor(args: argparse.Namespace) -> int:
    from .runner import detect_environment

    info = detect_environment(refresh=True, mode=args.mode)
    limits = Limits()
    kernel = _kernel_readiness(info)
    if args.json:
        data = info.to_dict()
        data["gvisor_kernel"] = kernel
        data["limits"] = {**dataclasses.asdict(limits), "enforcement": {
            name: how.summary for name, how in registry.enforcement().items()}}
        data["network"] = {name: how.network for name, how in registry.enforcement().items()}
        print(json.dumps(data, indent=2, default=str))
    else:
        print(f"gvisor-magic {__version__}")
        print(info.explain())
        here = (info.auto_backend,) if info.auto_backend else None
        print(f"\ndefault limits: {limits.describe(registry.enforcement(here))}")
        for name, how in registry.enforcement().items():
            print(f"  {name}: {how.summary}")
        print("\nnetwork (network=...):")
        for name, how in registry.enforcement().items():
            print(f"  {name}: {how.network}")
        can = "can start" if kernel["can_start"] else "CANNOT start"
        print(f"\nPython 3 (gVisor) kernel: {can} here: {kernel['reason']}")
        where = kernel["kernelspec"] or "not installed (gvisor-magic kernelspec install --user)"
        print(f"  kernelspec: {where}")
    if args.require_isolation and not info.isolated:
        return 1
    return 0


def _kernel_readiness(info) -> dict[str, object]:
    from .kernel.kernelspec import installed, readiness

    name = registry.kernel_backend()
    status = info.backends.get(name) if name else None
    if status is None:
        ok, reason = False, "no backend here can host a gVisor kernel"
    else:
        ok, reason = readiness(status.available, status.reason)
    try:
        where = installed()
    except ImportError:
        where = None
    return {"can_start": ok, "reason": reason, "kernelspec": where}


def _run(args: argparse.Namespace) -> int:
    from .runner import run_command_isolated
    from .warm import POOL

    POOL.ready = False  # one command per process: a sandbox booted for a next one is waste

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("gvisor-magic run: give a command after --", file=sys.stderr)
        return 2

    def stream(name: str, text: str) -> None:
        target = sys.stdout if name == "stdout" else sys.stderr
        target.write(text)
        target.flush()

    try:
        env = parse_pairs(args.env or (), "--env")
        spec = SandboxSpec.from_options({
            "working_dir": args.workdir, "repo_path": args.repo,
            **with_named_settings(_sandbox_options(args)), "writes": args.writes})
    except GvisorMagicError as exc:
        print(f"gvisor-magic run: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_command_isolated(
            command[0] if args.shell else command, spec, timeout=args.timeout, env=env,
            mode=args.mode, require_isolation=True if args.require_isolation else None,
            on_output=None if args.json else stream)
    except IsolationUnavailable as exc:
        print(f"gvisor-magic: {exc}", file=sys.stderr)
        return 125
    except CommandInterrupted as exc:
        print(f"\ngvisor-magic: interrupted; {exc.result.describe()}", file=sys.stderr)
        return 130
    except (GvisorMagicError, TypeError, ValueError) as exc:
        print(f"gvisor-magic: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.quiet:
        print(f"[gvisor-magic] {result.describe()}", file=sys.stderr)
    if not args.json:
        for warning in result.warnings(held=False):
            print(f"[gvisor-magic] WARNING: {warning}", file=sys.stderr)
        if result.held:
            print(f"[gvisor-magic] {len(result.held)} change(s) to the working dir were held "
                  "and are discarded now (this command cannot be asked later; nothing of "
                  "them reached the host):", file=sys.stderr)
            for c in result.held:
                print(f"  {c.kind} {c.path}: {c.held_reason}", file=sys.stderr)
    if result.writes is not None:
        result.writes.close()  # nothing can apply them once this process is gone
    if result.returncode < 0:
        return 128 - result.returncode
    return result.returncode


def _sandbox_options(args: argparse.Namespace) -> dict[str, object]:
    """The sandbox settings ``run`` and ``kernelspec`` share, as ``SandboxSpec.from_options``
    names them: only those given."""
    options = {"network": args.network, "allow_hosts": args.allow_host,
               "limits": parse_pairs(args.limit or (), "--limit", form="NAME=VALUE"),
               "protected_paths": args.protect,
               "writes": getattr(args, "kernel_writes", None),
               "sandbox": named_settings(parse_pairs(args.set or (), "--set",
                                                     form="NAME=VALUE"), "--set")}
    return {name: value for name, value in options.items() if value}


def _mcp(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("mcp") is None:
        print("gvisor-magic mcp: the MCP SDK is not installed (pip install "
              "'gvisor-magic[agents]')", file=sys.stderr)
        return 2
    from .mcp_server import load_config, serve, settings_from

    try:
        options = load_config(args.config) if args.config else {}
        given = {"working_dir": args.workdir, "timeout": args.timeout,
                 "require_isolation": args.require_isolation, "mode": args.mode,
                 **_sandbox_options(args)}
        if "sandbox" in given:
            raise GvisorMagicError("--set is not a setting of the agent server")
        options.update({k: v for k, v in given.items() if v is not None})
        settings = settings_from(options)
        token = None
        if args.token_file:
            with open(args.token_file) as handle:
                token = handle.read().strip()
            if not token:
                raise GvisorMagicError(f"the token file {args.token_file} is empty")
    except (GvisorMagicError, TypeError, OSError) as exc:
        print(f"gvisor-magic mcp: {exc}", file=sys.stderr)
        return 2
    serve(settings, http_port=args.http, token=token)
    return 0


def _kernelspec(args: argparse.Namespace) -> int:
    from .kernel import DISPLAY_NAME, KERNEL_NAME, kernelspec

    if args.verb == "remove":
        removed = kernelspec.remove()
        print(f"removed {removed}" if removed else f"no {KERNEL_NAME} kernelspec installed")
        return 0
    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        # Checked by kernelspec.kernel_json, kept as written, applied by the kernel.
        config = _sandbox_options(args)
        if args.pool is not None:
            config["pool"] = args.pool
        where = kernelspec.install(user=args.user, prefix=prefix, config=config)
    except GvisorMagicError as exc:
        print(f"gvisor-magic kernelspec: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gvisor-magic kernelspec: cannot install: {exc} (try --user or --sys-prefix)",
              file=sys.stderr)
        return 1
    print(f"installed {DISPLAY_NAME!r} ({KERNEL_NAME}) in {where}")
    return 0


def _held(args: argparse.Namespace) -> int:
    """``gvisor-magic held``: the held changes of this user's running gVisor kernels."""
    from .kernel import cells

    args.verb = args.verb or "list"
    running = cells.running_kernels()
    if args.kernel is not None and args.kernel not in running:
        print(f"gvisor-magic held: no running gVisor kernel {args.kernel!r} holds writes "
              f"(running: {', '.join(running) or 'none'})", file=sys.stderr)
        return 1
    kernels = [args.kernel] if args.kernel is not None else running
    if args.verb != "list":
        if not args.paths and not args.all and args.verb == "apply":
            print("gvisor-magic held apply: name the paths to apply, or --all",
                  file=sys.stderr)
            return 2
        if len(kernels) != 1:
            print(f"gvisor-magic held {args.verb}: "
                  + ("no running gVisor kernel holds writes" if not kernels else
                     f"say which kernel with --kernel ({', '.join(kernels)})"),
                  file=sys.stderr)
            return 1
    answers = []
    for kernel_id in kernels:
        try:
            answers.append(cells.ask(kernel_id, args.verb, args.paths or None))
        except (OSError, ValueError) as exc:
            print(f"gvisor-magic held: kernel {kernel_id} did not answer ({exc})",
                  file=sys.stderr)
            if args.verb != "list":
                return 1
    if args.json:
        print(json.dumps(answers, indent=1))
        return 0
    for answer in answers:
        for line in answer.get("lines", []):
            print(line)
        held = answer.get("held", [])
        print(f"kernel {answer.get('kernel_id')} ({answer.get('working_dir')}): "
              f"{len(held)} change(s) held")
        for change in held:
            why = f"  ({change['held_reason']})" if change.get("held_reason") else ""
            print(f"  {change['kind']:9} {change['path']}{why}")
    if not answers and args.verb == "list":
        print("no running gVisor kernel holds writes")
    return 0


def _add_sandbox_options(parser: argparse.ArgumentParser) -> None:
    """The sandbox settings ``run`` and ``kernelspec install`` take (``_sandbox_options``)."""
    add = parser.add_argument
    add("--network", nargs="?", const="public", default=None, metavar="POLICY",
        help="the sandbox's network: a preset (pypi, npm, github, huggingface, conda), hosts "
             "(comma-separated, host or host:port), 'public' (the default with no value: "
             "public addresses through the host's filtering proxy) or 'host' (the host's own "
             "network, unfiltered); off when not given")
    add("--allow-host", action="append", metavar="HOST[:PORT]", default=[],
        help="also allow this destination (repeatable): adds to --network's allowlist or to "
             "'public', makes one when the network is off")
    add("--limit", action="append", metavar="NAME=VALUE",
        help="resource limit, e.g. memory=1G, max_processes=64 (repeatable)")
    add("--protect", action="append", metavar="RULE",
        help="make RULE, a path of the working dir, read-only too; '-NAME' relaxes a built-in "
             "protected path (repeatable; see SECURITY.md)")
    add("--set", action="append", metavar="NAME=VALUE",
        help="any other sandbox setting by name, e.g. hostname=build (repeatable; see "
             "docs/api.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvisor-magic",
        description="Run commands in a gVisor sandbox and report where they ran.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every decision")
    sub = parser.add_subparsers(dest="action", required=True)

    doctor = sub.add_parser("doctor", help="report what was detected and which backend works")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--mode", choices=valid_modes(), default=None)
    doctor.add_argument("--require-isolation", action="store_true",
                        help="exit 1 unless commands would run under gVisor")
    doctor.set_defaults(handler=_doctor)

    run = sub.add_parser("run", help="run a command: gvisor-magic run [options] -- CMD ARGS...")
    run.add_argument("--mode", choices=valid_modes(), default=None,
                     help="backend (default: $GVISOR_MAGIC_MODE or auto)")
    run.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    run.add_argument("--workdir", default=None,
                     help="host directory mounted read-write as the cwd (default: a fresh "
                          "temporary directory)")
    run.add_argument("--repo", default=None, help="host directory mounted read-only")
    run.add_argument("--env", action="append", metavar="KEY=VALUE", help="repeatable")
    run.add_argument("--require-isolation", action="store_true",
                     help="fail (exit 125) rather than run without gVisor")
    _add_sandbox_options(run)
    run.add_argument("--shell", action="store_true",
                     help="treat the single CMD argument as a shell script")
    run.add_argument("--writes", choices=WRITES, default=None,
                     help="what happens to the command's writes to the working dir: 'auto' "
                          "(they land unless a host tool would run or load them; those are "
                          "held and listed; the default where gVisor runs), 'review' (all held "
                          "and listed), 'direct' (they land as made; the default where writes "
                          "cannot be held). The CLI cannot ask you later: held changes are "
                          "discarded when it exits (--json lists them with diffs)")
    run.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    run.add_argument("-q", "--quiet", action="store_true", help="no status line on stderr")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(handler=_run)

    spec = sub.add_parser("kernelspec", help="install or remove the 'Python 3 (gVisor)' kernel, "
                          "whose every cell runs in gVisor")
    spec.add_argument("verb", choices=("install", "remove"))
    where = spec.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="in your Jupyter data dir")
    where.add_argument("--sys-prefix", action="store_true",
                       help="in this Python environment (sys.prefix)")
    where.add_argument("--prefix", default=None, help="under PREFIX/share/jupyter/kernels")
    _add_sandbox_options(spec)
    spec.add_argument("--writes", dest="kernel_writes", choices=WRITES, default=None,
                      help="what happens to the cells' writes to the working dir: 'auto' "
                           "(the default: they land as each cell ends, unless a host tool "
                           "would run or load them; those are held and listed in the cell), "
                           "'review' (all held), 'direct' (they land as made)")
    spec.add_argument("--pool", type=int, default=None, metavar="N",
                      help="kernels of the same settings and folder the Jupyter server keeps "
                           "started ahead of need once one has started (default 1; 0: none)")
    spec.set_defaults(handler=_kernelspec)

    held = sub.add_parser("held", help="list, apply or discard what running 'Python 3 "
                          "(gVisor)' kernels hold back from the working dir")
    held.set_defaults(handler=_held, verb="list", paths=[], kernel=None, all=False,
                      json=False)
    verbs = held.add_subparsers(dest="verb")
    for verb, about in (("list", "what each kernel holds (the default)"),
                        ("apply", "write held changes into the working dir"),
                        ("discard", "throw held changes away (all, without paths)")):
        one = verbs.add_parser(verb, help=about)
        if verb != "list":
            one.add_argument("paths", nargs="*", metavar="PATH",
                             help="relative to the kernel's working dir (a directory stands "
                                  "for what is below it)")
        one.add_argument("--kernel", default=None, metavar="ID",
                         help="the kernel, as its cells name it (needed when several hold "
                              "writes)")
        if verb == "apply":
            one.add_argument("--all", action="store_true", help="apply every held change")
        one.add_argument("--json", action="store_true", help="machine-readable output")

    mcp = sub.add_parser("mcp", help="serve the runner to coding agents over MCP (stdio, or "
                         "streamable HTTP on 127.0.0.1 with a token)")
    mcp.add_argument("--workdir", default=None,
                     help="the working dir every command runs in and every path is relative "
                          "to (default: the current directory)")
    _add_sandbox_options(mcp)
    mcp.add_argument("--writes", dest="kernel_writes", choices=WRITES, default=None,
                     help="what happens to the commands' writes: 'auto' (the default), "
                          "'review' (all held for the apply tool) or 'direct'")
    mcp.add_argument("--timeout", type=float, default=None,
                     help="the longest a command may run, in seconds (default 300); a tool "
                          "call may ask for less, never more")
    mcp.add_argument("--require-isolation", action="store_true", default=None,
                     help="refuse every command when gVisor is unusable here, saying why")
    mcp.add_argument("--mode", choices=valid_modes(), default=None)
    mcp.add_argument("--config", default=None, metavar="FILE",
                     help="a JSON object of the same settings (working_dir, network, "
                          "allow_hosts, limits, protected_paths, writes, timeout, "
                          "require_isolation, mode); the command line wins")
    mcp.add_argument("--http", type=int, default=None, metavar="PORT",
                     help="serve streamable HTTP on 127.0.0.1:PORT instead of stdio")
    mcp.add_argument("--token-file", default=None, metavar="FILE",
                     help="with --http: the bearer token, read from FILE (default: a new "
                          "one, printed on stderr)")
    mcp.set_defaults(handler=_mcp)

    # Listed here for --help; its options are the installer's own (gvisor-magic install -h).
    sub.add_parser("install", add_help=False,
                   help="install runsc, and with --docker register it with Docker "
                        "(see gvisor-magic install --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["install"]:
        from .install import main as install

        return install(argv[1:], prog="gvisor-magic install")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
