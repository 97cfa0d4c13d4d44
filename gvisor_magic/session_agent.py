"""PID 1 of a warm sandbox: runs commands sent by the host, one at a time.

Its source is passed to the sandbox's Python with ``-I -S -c`` (never imported
inside the sandbox), so it uses only built-in modules.

Protocol, over the agent's stdin (host -> agent) and stdout (agent -> host):
every frame is ``TYPE`` (1 byte) + ``LENGTH`` (4 bytes, big-endian) + payload.

  host -> agent   R  JSON {"argv", "cwd", "env", "stdin": hex or null}   run a command
                  G  (empty)                  go: run the command just accepted
                  K  (empty)                                               kill the command
  agent -> host   H  JSON {"pid"}             ready (sent once, at start)
                  A  (empty)                  request accepted; runs only after the host's G
                  O / E  bytes                stdout / stderr of the command
                  X  JSON {"exit": N} or {"signal": N} or {"error": text}

The command gets its own pipes, never the agent's, so nothing it prints can be
taken for a frame. When a command ends (or is killed), every other process in
the sandbox is killed too: like a one-shot sandbox, nothing keeps running.

Creating a process is what a command costs inside gVisor (~10-20 ms for the exec
of ``/bin/sh`` on 2 cores), so after each command the agent starts the next
shell ahead of time: ``sh -c '. /dev/fd/3'`` waits on a pipe for its script.
A shell command then costs a pipe write (~2 ms). The script arrives prefixed with
one line that closes fd 3 and brings cwd and environment to what the request
asks (``cd``, ``unset``, ``export``), so the command sees what ``sh -c`` would
give it. The shell starts with the sandbox's base environment, never with the
previous command's: what one command was given cannot be read by the next from
``/proc/$$/environ``. One difference remains: ``sh -c`` replaces itself with its last
command, a sourced script does not, so a last command killed by signal N is
reported as the shell reports it (exit 128+N) rather than as the signal.
A command given as an argv list becomes ``exec 'prog' 'arg'…``: the shell
replaces itself, so its statuses stay exact. Only variable names the shell
cannot hold send a command the slow way (a direct spawn).
"""

import fcntl
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys

MAX_REQUEST = 16 * 1024 * 1024
PIPE_SIZE = 1 << 20


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


def clean_between():
    """What a command may leave outside /tmp and HOME: new files in /dev and /dev/shm are
    removed, and lowered limits of this process (``prlimit`` on PID 1, which every later
    command would inherit) are restored. Returns why the sandbox can no longer be trusted
    ("" when it can): a lowered hard limit cannot be raised again without privileges."""
    for directory, base in (("/dev/shm", BASE_SHM), ("/dev", BASE_DEV)):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name in base:
                continue
            path = os.path.join(directory, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
            except OSError:
                pass
    tainted = ""
    for limit, value in BASE_LIMITS.items():
        try:
            if resource.getrlimit(limit) != value:
                resource.setrlimit(limit, value)
        except (OSError, ValueError):
            tainted = "a command lowered the sandbox's own limits (prlimit on PID 1)"
    return tainted


def reap():
    """Collect every ended child, keeping their statuses (the command's is read later)."""
    while True:
        try:
            done, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if done == 0:
            return
        REAPED[done] = raw


REAPED = {}


def spawn(argv, env, extra=()):
    """Start ``argv`` in its own session with fresh pipes: (pid, stdin_w, stdout_r, stderr_r)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    for fd in (out_r, err_r):  # fewer, larger reads: each loop here costs gVisor syscalls
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
    try:
        pid = os.posix_spawnp(
            argv[0], argv, env, setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores them; exec keeps that
            file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                          (os.POSIX_SPAWN_DUP2, err_w, 2)]
            + [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in extra])
    except OSError:
        for fd in (out_r, err_r, in_w):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, in_r):
            os.close(fd)
    return pid, in_w, out_r, err_r


SHELLS = ("/bin/sh", "sh")
READY = None  # the shell started ahead of time: (pid, stdin_w, stdout_r, stderr_r, ctl_w, env, cwd)


def prestart():
    global READY
    if READY is not None:  # the last request never reached a command (bad cwd)
        return
    ctl_r, ctl_w = os.pipe()  # never fds 0-3 (stdio and the wakeup pipe come first)
    try:
        started = spawn(["sh", "-c", ". /dev/fd/3"], ENV, [(ctl_r, 3)])
    except OSError:
        os.close(ctl_w)
        return
    finally:
        os.close(ctl_r)
    READY = started + (ctl_w, dict(ENV), os.getcwd())


def shell_name(name):
    return name.isidentifier() and name.isascii()


def quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def take_ready(spec):
    """The pre-started shell and the script to send it, if it can run this request."""
    global READY
    ready, READY = READY, None
    if ready is None:
        return None
    argv, env = spec["argv"], spec["env"]
    if len(argv) == 3 and argv[0] in SHELLS and argv[1] == "-c":
        command = argv[2]
    elif not argv[0].startswith("-"):  # dash's exec takes no "--"
        command = "exec " + " ".join(map(quote, argv))  # statuses stay exact
    else:
        command = None
    if command is None or not all(map(shell_name, env)) or not all(map(shell_name, ready[5])):
        for fd in ready[1:5]:
            os.close(fd)
        try:
            os.kill(ready[0], signal.SIGKILL)
        except OSError:
            pass
        return None
    line = ["exec 3<&-"]
    if spec["cwd"] != ready[6]:
        line.append("cd -P -- %s && unset OLDPWD || exit 126" % quote(spec["cwd"]))
    line += ["unset " + name for name in ready[5] if name not in env]
    line += ["export %s=%s" % (name, quote(value)) for name, value in env.items()
             if ready[5].get(name) != value]
    return ready, ("; ".join(line) + "; " + command).encode(errors="surrogateescape")


def run(request):
    spec = json.loads(request)
    send(b"A")
    # The fence: start only when the host says go. A host that gave up on this agent
    # (it stalled past the accept deadline) never does, and runs the command elsewhere.
    try:
        kind, _ = read_frame()
    except EOFError:
        return
    if kind != b"G":
        return
    script = b""
    ctl_w = None
    try:
        os.chdir(spec["cwd"])
        taken = take_ready(spec)
        if taken is not None:
            (pid, in_w, out_r, err_r, ctl_w, _, _), script = taken
        else:
            pid, in_w, out_r, err_r = spawn(spec["argv"], spec["env"])
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        message = f"{spec['argv'][0]}: {exc.strerror}\n"
        send(b"E", message.encode(errors="replace"))
        send(b"X", json.dumps({"exit": code}).encode())
        return
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
        if ctl_w is not None:
            writers.append(ctl_w)
        ready_r, ready_w, _ = select.select(readers, writers, [], 0.5)
        if ctl_w is not None and ctl_w in ready_w:
            try:  # a long script goes in pieces: the shell runs it while reading
                written = os.write(ctl_w, script[:65536])
                script = script[written:]
            except OSError:
                script = b""
            if not script:
                os.close(ctl_w)
                ctl_w = None
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
            if pid in REAPED:  # a kill already collected it: its status is kept there
                done, raw = pid, REAPED.pop(pid)
            else:
                try:
                    done, raw = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, raw = pid, REAPED.pop(pid, signal.SIGKILL if killed else 0)
            if done == pid:
                status = raw
                kill_everything_else()  # what it left behind holds no pipe open now
        if status is not None and not streams:
            break
    for fd in (in_w, ctl_w):
        if fd is not None:
            os.close(fd)
    reap()
    REAPED.clear()
    if os.WIFSIGNALED(status):
        report = {"signal": os.WTERMSIG(status)}
    else:
        report = {"exit": os.WEXITSTATUS(status)}
    if killed:
        report["killed"] = True
    tainted = clean_between()
    if tainted:
        report["tainted"] = tainted
    send(b"X", json.dumps(report).encode())


WAKE = (-1, -1)
ENV = {}
BASE_DEV, BASE_SHM, BASE_LIMITS = set(), set(), {}


def main():
    global WAKE, ENV
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
    ENV = dict(os.environ)
    for directory, base in (("/dev/shm", BASE_SHM), ("/dev", BASE_DEV)):
        try:
            base.update(os.listdir(directory))
        except OSError:
            pass
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            try:
                BASE_LIMITS[getattr(resource, name)] = resource.getrlimit(getattr(resource, name))
            except (OSError, ValueError):
                pass
    send(b"H", ("{\"pid\": %d}" % os.getpid()).encode())
    prestart()
    while True:
        try:
            kind, payload = read_frame()
        except EOFError:
            break
        if kind == b"R":
            run(payload)
            prestart()
        # a stray K between commands has nothing to kill
    kill_everything_else()
    sys.exit(0)


if __name__ == "__main__":
    main()
