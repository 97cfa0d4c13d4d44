"""PID 1 of a warm sandbox: runs commands sent by the host, one at a time.

Its source is passed to the sandbox's Python with ``-I -S -c`` (never imported
inside the sandbox), so it uses only built-in modules.

Protocol, over the agent's stdin (host -> agent) and stdout (agent -> host):
every frame is ``TYPE`` (1 byte) + ``LENGTH`` (4 bytes, big-endian) + payload.

  host -> agent   R  JSON {"argv", "cwd", "env", "stdin": hex or null}   run a command
                  K  (empty)                                               kill the command
  agent -> host   H  JSON {"pid"}             ready (sent once, at start)
                  A  (empty)                  request accepted; the command may now run
                  O / E  bytes                stdout / stderr of the command
                  X  JSON {"exit": N} or {"signal": N} or {"error": text}

The command gets its own pipes, never the agent's, so nothing it prints can be
taken for a frame. When a command ends (or is killed), every other process in
the sandbox is killed too: like a one-shot sandbox, nothing keeps running.
"""

import json
import os
import select
import signal
import struct
import sys

MAX_REQUEST = 16 * 1024 * 1024


def send(kind, payload=b""):
    data = kind + struct.pack(">I", len(payload)) + payload
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def read_exactly(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame():
    header = read_exactly(0, 5)
    kind, size = header[:1], struct.unpack(">I", header[1:])[0]
    if size > MAX_REQUEST:
        raise EOFError
    return kind, read_exactly(0, size)


def kill_everything_else():
    """Kill every process in the sandbox but this one (the command's whole tree)."""
    me = os.getpid()
    for _ in range(3):
        others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
        if not others:
            return
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap()


def reap():
    while True:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if done == 0:
            return


def run(request):
    spec = json.loads(request)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    send(b"A")
    try:
        os.chdir(spec["cwd"])
        pid = os.posix_spawnp(
            spec["argv"][0], spec["argv"], spec["env"], setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores them; exec keeps that
            file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                          (os.POSIX_SPAWN_DUP2, err_w, 2)])
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            os.close(fd)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        message = f"{spec['argv'][0]}: {exc.strerror}\n"
        send(b"E", message.encode(errors="replace"))
        send(b"X", json.dumps({"exit": code}).encode())
        return
    for fd in (out_w, err_w, in_r):
        os.close(fd)
    pending = bytes.fromhex(spec["stdin"]) if spec.get("stdin") else b""
    if not pending:
        os.close(in_w)
        in_w = None
    streams = {out_r: b"O", err_r: b"E"}
    status = None
    killed = False
    while True:
        readers = list(streams) + [0, WAKE[0]]
        writers = [in_w] if in_w is not None else []
        ready_r, ready_w, _ = select.select(readers, writers, [], 0.5)
        if in_w is not None and in_w in ready_w:
            try:
                written = os.write(in_w, pending[:65536])
                pending = pending[written:]
            except OSError:
                pending = b""
            if not pending:
                os.close(in_w)
                in_w = None
        for fd in ready_r:
            if fd == WAKE[0]:
                try:
                    os.read(fd, 4096)  # SIGCHLD arrived: check the child below
                except OSError:
                    pass
                continue
            if fd == 0:
                kind, _ = read_frame()
                if kind == b"K":
                    killed = True
                    kill_everything_else()
                continue
            chunk = os.read(fd, 1 << 20)
            if chunk:
                send(streams[fd], chunk)
            else:
                os.close(fd)
                del streams[fd]
        if status is None:
            try:
                done, raw = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, raw = pid, 0
            if done == pid:
                status = raw
                kill_everything_else()  # what it left behind holds no pipe open now
        if status is not None and not streams:
            break
    if in_w is not None:
        os.close(in_w)
    reap()
    if os.WIFSIGNALED(status):
        report = {"signal": os.WTERMSIG(status)}
    else:
        report = {"exit": os.WEXITSTATUS(status)}
    if killed:
        report["killed"] = True
    send(b"X", json.dumps(report).encode())


WAKE = (-1, -1)


def main():
    global WAKE
    # SIGCHLD wakes the select loop at once when a command exits (no polling delay).
    WAKE = os.pipe()
    os.set_blocking(WAKE[0], False)
    os.set_blocking(WAKE[1], False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(WAKE[1])
    home = os.environ.get("HOME")
    if home:
        try:
            os.makedirs(home, 0o700, exist_ok=True)
        except OSError:
            pass
    send(b"H", ("{\"pid\": %d}" % os.getpid()).encode())
    while True:
        try:
            kind, payload = read_frame()
        except EOFError:
            break
        if kind == b"R":
            run(payload)
        # a stray K between commands has nothing to kill
    kill_everything_else()
    sys.exit(0)


if __name__ == "__main__":
    main()
