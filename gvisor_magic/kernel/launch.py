"""The host process of a "Python 3 (gVisor)" kernel: ipykernel, run inside a gVisor sandbox.

The provisioner (``provisioner.py``) starts it in place of the kernel::

    python -m gvisor_magic.kernel.launch --spec FILE [--ready-fd N]
        -- python -m ipykernel_launcher -f DIR/connection.json

``FILE`` is the sandbox, a ``SandboxSpec`` as JSON (``SandboxSpec.from_json`` reads and
checks it again): the kernel's settings, its working dir and its sockets dir ``DIR``
(``kernel_dir``). By hand, ``--sockets DIR --working-dir DIR`` instead of ``--spec``
give a sandbox of the default settings.

It starts a warm runsc sandbox (``IsolatedSession``) with the layout of ``%%isolated``
(the working dir read-write, protected paths, the environment an allowlist, the network
off or an allowlist, limits including memory), plus ``DIR`` read-write at its own path,
where the kernel's ZMQ IPC sockets are made (``runsc --host-uds=create``), and runs the
kernel there as its one command. It ends the sandbox on SIGTERM or SIGHUP (shutdown,
restart) and when the server that started it dies. Only the first such signal stops the
kernel: one that comes while the sandbox is being removed (Jupyter sends SIGTERM when a
kernel has not exited a few seconds after its shutdown request, which a loaded machine
can take just to remove the sandbox) is ignored, so the removal is never cut short. If it
is killed (SIGKILL), the provisioner removes what it left (``GvisorProvisioner.cleanup``).
The kernel's exit status is its own (137 after a memory kill), so Jupyter sees a dead
kernel as it would.

Started ahead of need (``pool.py``), with ``--claim-fd N``, the kernel starts as any kernel
does (on a connection file the pool wrote) and is claimed later: the launcher reads one
JSON line on that inherited pipe, ``{"kernel_id": ...}``, and names the kernel's held
writes by that id; the provisioner gives the kernel its environment (``JPY_SESSION_NAME``)
on a socket the kernel makes in its sockets dir (``CLAIM_SOCKET``, ``CLAIM_LISTEN``). The
pipe closed without a claim (the pool shut the kernel down, or the server died) ends the
kernel and its sandbox.

Fails closed: where no runsc sandbox can start, it says why on stderr and exits 1; it
never runs the kernel anywhere else. With ``--ready-fd N`` it also tells the provisioner,
on that inherited pipe: ``ok`` once the sandbox runs (before the kernel starts in it), or
the reason it could not start one; then it closes the pipe.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import registry
from ..errors import CommandInterrupted, GvisorMagicError
from ..request import SandboxSpec
from ..session import IsolatedSession
from .cells import CELL_ENV, CELL_HOOK, CellWrites, HeldControl

#: Exit status when the sandbox cannot start here (nothing ran).
EXIT_UNAVAILABLE = 1
#: Variables of the server's environment a kernel may see (the rest never enter).
PASSED = ("JPY_SESSION_NAME",)
#: Where ``%pip install`` puts packages: this environment is a read-only mount, so pip
#: installs here instead (in the sandbox's private /tmp, gone with the kernel); the kernel
#: and the programs it starts import from it.
PACKAGES = "/tmp/kernel-packages"
KERNEL_ENV = {"PIP_TARGET": PACKAGES, "PYTHONPATH": PACKAGES,
              "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
#: Said by ``%pip`` before pip runs, when the kernel's network is off (pip itself only
#: says it found no version: it hides the proxy's "the network is off").
PIP_NOTE = ("gvisor-magic: this kernel's network is off, so %pip can install only files "
            "already here (packages go to {packages}: this environment is read-only). To "
            "download from PyPI: gvisor-magic kernelspec install --user --network pypi")
#: Where a kernel started ahead of need waits for its claim (in its sockets dir), and the
#: variable that tells it where.
CLAIM_SOCKET = "gvisor-magic-claim"
CLAIM_ENV = "GVISOR_MAGIC_CLAIM"
#: Run inside a kernel started ahead of need, before it starts as any kernel does: a thread
#: that takes its claim (one JSON object, its environment) on ``CLAIM_SOCKET``, sets it,
#: and ``__session__`` if the shell already read the environment, then answers ``ok``.
CLAIM_LISTEN = r"""
claim = os.environ.pop('GVISOR_MAGIC_CLAIM', '')
if claim:
    import json, socket, threading
    claim_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(claim):
        os.unlink(claim)
    claim_listener.bind(claim)
    claim_listener.listen(1)
    def take_claim(listener=claim_listener, path=claim):
        conn = listener.accept()[0]
        listener.close()
        os.unlink(path)
        data = b''
        while not data.endswith(b'\n') and len(data) < (1 << 20):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        env = json.loads(data or b'{}')
        os.environ.update({str(k): str(v) for k, v in env.items()})
        from IPython.core.interactiveshell import InteractiveShell
        if InteractiveShell.initialized() and env.get('JPY_SESSION_NAME'):
            InteractiveShell.instance().user_ns['__session__'] = env['JPY_SESSION_NAME']
        conn.sendall(b'ok\n')
        conn.close()
    threading.Thread(target=take_claim, daemon=True, name='gvisor-magic-claim').start()
"""
#: ``python -m ipykernel_launcher`` after making ``PACKAGES`` (so it is on sys.path now),
#: with ``%pip`` saying ``PIP_NOTE`` first where it is set.
BOOT = ("import importlib, os, runpy, sys\n"
        "os.makedirs(os.environ['PIP_TARGET'], exist_ok=True)\n"
        "importlib.invalidate_caches()\n"
        "note = os.environ.pop('GVISOR_MAGIC_PIP_NOTE', '')\n"
        "if note:\n"
        "    from IPython.core.magics import packaging\n"
        "    plain = packaging.PackagingMagics.pip\n"
        "    def pip(self, line, plain=plain):\n"
        "        print(note, flush=True)\n"
        "        return plain(self, line)\n"
        "    pip.__doc__ = plain.__doc__\n"
        "    packaging.PackagingMagics.pip = pip\n"
        + CELL_HOOK + CLAIM_LISTEN +
        "sys.argv[0] = 'ipykernel_launcher'\n"
        "runpy.run_module('ipykernel_launcher', run_name='__main__', alter_sys=True)\n")


def kernel_argv(argv: list[str]) -> list[str]:
    """The kernelspec's command, with ``-m ipykernel_launcher`` started through ``BOOT``."""
    if argv[1:3] == ["-m", "ipykernel_launcher"]:
        return [argv[0], "-c", BOOT, *argv[3:]]
    return argv


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gvisor_magic.kernel.launch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--spec", metavar="FILE",
                        help="the sandbox: a SandboxSpec as JSON (written by the provisioner)")
    parser.add_argument("--sockets", help="without --spec: the kernel's private dir "
                        "(connection file and IPC sockets)")
    parser.add_argument("--working-dir", help="without --spec: mounted read-write (the cwd)")
    parser.add_argument("--ready-fd", type=int, default=None, metavar="N",
                        help="an inherited pipe: 'ok' once the sandbox runs, else the reason")
    parser.add_argument("--kernel-id", default=None,
                        help="the kernel's id, which 'gvisor-magic held' names it by")
    parser.add_argument("--claim-fd", type=int, default=None, metavar="N",
                        help="started ahead of need: an inherited pipe the kernel's claim "
                             "comes on (a JSON line); closed without one, the kernel ends")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    if not args.argv:
        parser.error("give the kernel's command after --")
    if (args.spec is None) == (args.sockets is None or args.working_dir is None):
        parser.error("give --spec FILE, or --sockets DIR and --working-dir DIR")
    return args


def spec_of(args: argparse.Namespace) -> SandboxSpec:
    """The sandbox the kernel runs in; bad settings raise ``InvalidRequestError``."""
    if args.spec is not None:
        return SandboxSpec.from_json(Path(args.spec).read_text())
    return SandboxSpec.from_options({"working_dir": args.working_dir,
                                     "kernel_dir": args.sockets,
                                     "python_path": python_path(os.environ)})


def python_path(environ: Mapping[str, str]) -> list[str]:
    """The dirs of ``environ``'s PYTHONPATH (the kernel imports what the server imports)."""
    found = []
    for entry in environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isdir(entry):
            found.append(os.path.realpath(entry))
    return list(dict.fromkeys(found))


class _Ready:
    """The provisioner's pipe (``--ready-fd``): told once whether the sandbox started."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            try:
                os.set_inheritable(fd, False)  # not for the sandbox's processes
            except OSError:
                self.fd = None  # not given to us after all: nothing to tell

    def tell(self, text: str) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, text.encode("utf-8", "replace")[:60000])
        except OSError:
            pass  # the provisioner gave up waiting: stderr still says why
        finally:
            os.close(fd)


def _forward(stream: str, text: str) -> None:
    target = sys.stdout if stream == "stdout" else sys.stderr
    target.write(text)
    target.flush()


class _Stop:
    """The SIGTERM/SIGHUP handler: stops the kernel once, and never the sandbox's removal.

    While ``armed`` (the kernel runs), the first signal raises ``KeyboardInterrupt`` in the
    main thread, which ends the kernel's command; every other one is only noted
    (``requested``). Raising at any other time could cut short the sandbox's start (its
    transport made but not yet the session's) or its removal (``session.close``), leaving
    its run dir and processes behind: seen here under load, where Jupyter's SIGTERM came
    while ``close`` was running ``runsc kill`` or removing the run dir.
    """

    def __init__(self) -> None:
        self.armed = False
        self.requested = False

    def __call__(self, _signum: int, _frame: object) -> None:
        self.requested = True
        if self.armed:
            self.armed = False  # one KeyboardInterrupt, whatever comes next
            raise KeyboardInterrupt


def _end_with_parent(parent: int, every: float = 1.0) -> None:
    """SIGTERM ourselves once the server that started us is gone (we were re-parented), as
    ipykernel's own parent poller does: a dead server leaves no kernel and no sandbox."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="gvisor-magic-parent").start()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    ready = _Ready(args.ready_fd)
    try:
        spec = spec_of(args)
    except (GvisorMagicError, OSError, TypeError, ValueError) as exc:
        print(f"gvisor-magic: bad Python 3 (gVisor) kernel settings: {exc}", file=sys.stderr)
        ready.tell(f"bad kernel settings: {exc}")
        return 2
    stop = _Stop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    # The kernel is interrupted by a message ("interrupt_mode": "message"); a Ctrl-C meant
    # for the server that started us is not for the kernel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent(os.getppid())
    session = IsolatedSession(spec, mode=registry.kernel_backend(), require_isolation=True)
    cells = control = claim = None
    try:
        try:
            session.start()
        except GvisorMagicError as exc:
            print(f"gvisor-magic: the Python 3 (gVisor) kernel cannot start here: {exc}",
                  file=sys.stderr, flush=True)
            ready.tell(str(exc))
            return EXIT_UNAVAILABLE
        if stop.requested:  # stopped while its sandbox started: no kernel
            ready.tell("the launcher was stopped (SIGTERM or SIGHUP) as its sandbox started")
            return 0
        ready.tell("ok\n")
        env = {name: os.environ[name] for name in PASSED if name in os.environ}
        env.update(KERNEL_ENV)
        env["PYTHONPATH"] = os.pathsep.join([*spec.python_path, PACKAGES])
        if not spec.network.enabled:
            env["GVISOR_MAGIC_PIP_NOTE"] = PIP_NOTE.format(packages=PACKAGES)
        if spec.holds_writes and spec.kernel_dir is not None:
            cells, control = _hold_cell_writes(session, spec.kernel_dir, args.kernel_id)
            env[CELL_ENV] = cells.path
        if args.claim_fd is not None and spec.kernel_dir is not None:
            claim = _Claim(args.claim_fd, session, os.path.join(spec.kernel_dir, CLAIM_SOCKET),
                           cells)
            env[CLAIM_ENV] = claim.path
            claim.start()
        stop.armed = True
        try:
            if stop.requested:  # a signal came just before it was armed
                stop.armed = False
                raise KeyboardInterrupt
            result = session.run(kernel_argv(args.argv), timeout=None, env=env,
                                 on_output=_forward)
        finally:
            # A KeyboardInterrupt raised here (it can be, before this line) is the one
            # the outer ``except`` takes; none comes after it.
            stop.armed = False
        if result.error:
            print(f"gvisor-magic: {result.error}", file=sys.stderr, flush=True)
        held = session.changes()
        if held:
            print(f"gvisor-magic: the kernel ended with {len(held)} change(s) held; they are "
                  "discarded: " + ", ".join(c.path for c in held[:20]),
                  file=sys.stderr, flush=True)
        code = result.returncode
        return 128 - code if code < 0 else code
    except (KeyboardInterrupt, CommandInterrupted):
        return 0
    finally:
        ready.tell("the launcher ended before its sandbox started")  # if not told yet
        if cells is not None:
            cells.stop()
        if control is not None:
            control.close()
        if claim is not None:
            claim.stop()
        session.discard()  # held changes live no longer than the kernel
        session.close()


def _hold_cell_writes(session: IsolatedSession, kernel_dir: str, kernel_id: str | None
                      ) -> tuple[CellWrites, HeldControl | None]:
    """The cell link and the ``gvisor-magic held`` socket of a kernel whose writes are held."""
    control = None
    if kernel_id:
        control = HeldControl(session, kernel_id)
        try:
            control.start()
        except OSError as exc:
            print(f"gvisor-magic: held changes cannot be applied from a terminal "
                  f"({control.path}: {exc})", file=sys.stderr, flush=True)
            control, kernel_id = None, None
    cells = CellWrites(session, kernel_dir, kernel_id)
    cells.start()
    return cells, control


class _Claim:
    """A kernel started ahead of need: waits for its claim on ``fd`` (``pool.py``), then
    names its held writes by the claimed id. A pipe closed without a claim stops the
    launcher (SIGTERM to itself, as a shutdown would). ``path`` is where the kernel takes
    its own part of the claim (``CLAIM_LISTEN``)."""

    def __init__(self, fd: int, session: IsolatedSession, path: str,
                 cells: CellWrites | None) -> None:
        import threading

        os.set_inheritable(fd, False)  # not for the sandbox's processes
        self.fd, self.session, self.path, self.cells = fd, session, path, cells
        self.control: HeldControl | None = None
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._wait, daemon=True,
                                        name="gvisor-magic-claim")

    def start(self) -> None:
        import contextlib

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.control is not None:
            self.control.close()

    def _wait(self) -> None:
        import json

        data = b""
        with os.fdopen(self.fd, "rb", buffering=0) as pipe:
            while not data.endswith(b"\n") and len(data) < 1 << 20:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                data += chunk
        try:
            claim = json.loads(data) if data.endswith(b"\n") else None
        except ValueError:
            claim = None
        if not isinstance(claim, dict) or self.stopped.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # not claimed: the kernel is not needed
            return
        kernel_id = claim.get("kernel_id")
        if isinstance(kernel_id, str) and kernel_id and self.cells is not None:
            self.control = HeldControl(self.session, kernel_id)
            try:
                self.control.start()
                self.cells.kernel_id = kernel_id
            except OSError as exc:
                print(f"gvisor-magic: held changes cannot be applied from a terminal "
                      f"({self.control.path}: {exc})", file=sys.stderr, flush=True)
                self.control = None


if __name__ == "__main__":
    sys.exit(main())
