"""A gVisor kernel's held writes, cell by cell.

The kernel is one long command in its sandbox, its working dir a copy-on-write layer
(``sandboxed/cow_layer.py``). When a cell ends, the kernel (``CELL_HOOK``, run inside the
sandbox before ipykernel starts) says so on a socket it makes in its sockets dir, and waits.
The launcher (``CellWrites``, on the host) has the sandbox copy out what changed in the
layer since the last cell (``IsolatedSession.copy_out_writes``), judges it and, in auto,
applies the inert changes, then answers with the text the kernel prints in that cell: what
was held back and why, and how to apply it. So a cell's CSV is in the folder when the cell
ends, and a module or a hook it wrote is not.

Held changes are applied or discarded from outside the kernel: ``gvisor-magic held``
(``HeldControl``: a socket in the user's Jupyter runtime dir, owner-only). Nothing the
kernel runs can apply them: a request from inside the sandbox would be one that any code
in a cell could make too.

The link is untrusted on the host side: lines are bounded, a kernel that asks too often only
gets more copies judged, and a broken link ends the cell reports (the final copy at the
kernel's end still happens).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Iterable

from .. import activity
from ..session import IsolatedSession
from ..writes import Writes

#: The kernel's end of the link, in its sockets dir (made inside with ``--host-uds=create``).
CELL_SOCKET = "gvisor-magic-cells"
#: The variable that tells the kernel where to make it.
CELL_ENV = "GVISOR_MAGIC_CELLS"
#: The largest line either end reads.
MAX_LINE = 1 << 20
#: Run inside the kernel (after ``launch.BOOT``'s imports): the ``post_run_cell`` hook.
CELL_HOOK = r"""
cells = os.environ.pop('GVISOR_MAGIC_CELLS', '')
if cells:
    import json, socket, threading
    from IPython.core.interactiveshell import InteractiveShell
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(cells):
        os.unlink(cells)  # the kernel's before a restart
    listener.bind(cells)
    listener.listen(1)
    link = []
    def take_link(listener=listener, link=link):
        try:
            link.append(listener.accept()[0])
        except OSError:
            pass
        finally:
            listener.close()
    threading.Thread(target=take_link, daemon=True, name='gvisor-magic-cells').start()
    def cell_ended(result=None, link=link):
        if not link:
            return
        try:
            link[0].sendall(b'cell\n')
            data = b''
            while not data.endswith(b'\n'):
                chunk = link[0].recv(1 << 16)
                if not chunk:
                    raise OSError('the launcher closed the link')
                data += chunk
            text = json.loads(data).get('text') or ''
        except (OSError, ValueError) as exc:
            link.clear()
            text = ('gvisor-magic: the writes of this cell and the next ones are taken only '
                    'when the kernel ends (%s)' % exc)
        if text:
            print(text, flush=True)
    plain_init_events = InteractiveShell.init_events
    def init_events(self, plain=plain_init_events, cell_ended=cell_ended):
        plain(self)
        self.events.register('post_run_cell', cell_ended)
    InteractiveShell.init_events = init_events
"""


def cell_text(writes: Writes | None, kernel_id: str | None) -> str:
    """What a cell prints about its writes: nothing when all landed (or none were made)."""
    if writes is None:
        return ""
    if writes.lost:
        return f"gvisor-magic: {writes.lost}"
    lines: list[str] = []
    held = writes.held()
    if held:
        lines.append(f"gvisor-magic: held back, not in your folder ({writes.mode} writes): a "
                     "host tool could run or load them:" if writes.mode == "auto" else
                     f"gvisor-magic: held for review, not in your folder ({writes.mode} "
                     "writes):")
        for change in held[:50]:
            mark = {"added": "+", "modified": "~", "deleted": "-"}.get(change.kind, "?")
            why = f"  -- {change.held_reason}" if change.held_reason else ""
            lines.append(f"  {mark} {change.path}{'/' if change.is_dir else ''}{why}")
        if len(held) > 50:
            lines.append(f"  ... and {len(held) - 50} more (gvisor-magic held)")
        which = f" --kernel {kernel_id}" if kernel_id else ""
        lines.append("Apply or discard them from a terminal, outside this kernel (nothing a "
                     "cell runs can apply its own writes):")
        lines.append(f"  gvisor-magic held apply{which} PATH...   (or --all)")
        lines.append(f"  gvisor-magic held discard{which} [PATH...]")
        lines.append("They are discarded when the kernel shuts down or restarts. The kernel "
                     "sees them meanwhile.")
    for path, why in sorted(writes.conflicts.items()):
        lines.append(f"gvisor-magic: NOT applied {path}: {why}")
    return "\n".join(lines)


def drop_own_bytecode(writes: Writes) -> None:
    """The kernel's own bytecode (it imported a module of the folder) is discarded at once:
    it is never applied (the host compiles its own), and the kernel keeps its copy."""
    mine = [c.path for c in writes.held()
            if (c.held_reason or "").startswith(f"{activity.BYTECODE}:")]
    if mine:
        writes.discard(mine)


def _read_line(conn: socket.socket) -> bytes | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > MAX_LINE:
            return None
    return data


class CellWrites:
    """The launcher's end of the kernel's link: a copy of the layer at every cell's end."""

    def __init__(self, session: IsolatedSession, kernel_dir: str,
                 kernel_id: str | None) -> None:
        self.session = session
        self.path = os.path.join(kernel_dir, CELL_SOCKET)
        self.kernel_id = kernel_id
        self.stopped = threading.Event()
        #: Cells whose writes were taken (for tests and logs).
        self.cells = 0
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="gvisor-magic-cell-writes")

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # the kernel's before a restart: never connected to
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _connect(self) -> socket.socket | None:
        while not self.stopped.wait(0.05):
            if not os.path.exists(self.path):
                continue
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self.path)
                return conn
            except OSError:
                conn.close()  # made but not listening yet
        return None

    def _serve(self) -> None:
        conn = self._connect()
        if conn is None:
            return
        with conn:
            conn.settimeout(0.5)
            while not self.stopped.is_set():
                try:
                    line = _read_line(conn)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if line is None or line.strip() != b"cell":
                    return  # the kernel ended, or broke the link's protocol
                writes = self.session.copy_out_writes()
                if writes is not None:
                    drop_own_bytecode(writes)
                self.cells += 1
                text = cell_text(writes, self.kernel_id)
                try:
                    conn.settimeout(None)
                    conn.sendall(json.dumps({"text": text}).encode() + b"\n")
                    conn.settimeout(0.5)
                except OSError:
                    return


def control_dir() -> str:
    """Where launchers listen for ``gvisor-magic held``: the user's Jupyter runtime dir."""
    from jupyter_core.paths import jupyter_runtime_dir

    return jupyter_runtime_dir()


def control_path(kernel_id: str) -> str:
    return os.path.join(control_dir(), f"gvisor-magic-held-{kernel_id}.sock")


class HeldControl:
    """The launcher's socket for ``gvisor-magic held``: list, apply and discard the
    kernel's held changes. Only this user's processes may connect (the socket is 0600 in
    an owner-only dir, and the peer's uid is checked)."""

    def __init__(self, session: IsolatedSession, kernel_id: str) -> None:
        self.session = session
        self.kernel_id = kernel_id
        self.path = control_path(kernel_id)
        self._listener: socket.socket | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), 0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(4)
        self._listener = listener
        threading.Thread(target=self._serve, daemon=True, name="gvisor-magic-held").start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _serve(self) -> None:
        while self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, ValueError):
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            return
        conn.settimeout(10)
        line = _read_line(conn)
        if line is None:
            return
        request = json.loads(line)
        op = request.get("op")
        paths = request.get("paths")
        if paths is not None and not (isinstance(paths, list)
                                      and all(isinstance(p, str) for p in paths)):
            raise ValueError("paths must be a list of strings")
        lines: list[str] = []
        if op == "apply":
            lines = self.session.apply(paths)
        elif op == "discard":
            lines = self.session.discard(paths)
        elif op != "list":
            lines = [f"unknown operation {op!r}"]
        held = [{"path": c.path, "kind": c.kind, "is_dir": c.is_dir,
                 "held_reason": c.held_reason, "diff": c.diff}
                for c in self.session.changes()]
        conn.sendall(json.dumps({"kernel_id": self.kernel_id,
                                 "working_dir": self.session.spec.working_dir,
                                 "held": held, "lines": lines}).encode() + b"\n")


def running_kernels() -> list[str]:
    """The ids of this user's gVisor kernels that hold writes (their sockets)."""
    try:
        names = os.listdir(control_dir())
    except FileNotFoundError:
        return []
    prefix, suffix = "gvisor-magic-held-", ".sock"
    return sorted(n[len(prefix):-len(suffix)] for n in names
                  if n.startswith(prefix) and n.endswith(suffix))


def ask(kernel_id: str, op: str, paths: Iterable[str] | None = None,
        timeout: float = 60.0) -> dict:
    """One request to a kernel's launcher (``HeldControl``); OSError if none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(control_path(kernel_id))
        conn.sendall(json.dumps({"op": op, "paths": None if paths is None else list(paths)}
                                ).encode() + b"\n")
        line = _read_line(conn)
    if line is None:
        raise OSError(f"the kernel {kernel_id} did not answer")
    return json.loads(line)
