"""PID 1 of a warm sandbox: runs commands sent by the host, one at a time.

Its source is passed to the sandbox's Python with ``-I -S -c`` (never imported
inside the sandbox), after ``egress_relay.py``'s (the network relay, see there) and
``agent_wire.py``'s (the wire's names, which it uses as its own), so it uses only
built-in modules. The host may import it (it has no side effects on import) but needs
only ``agent_wire``.

Protocol, over the agent's stdin (host -> agent) and stdout (agent -> host),
both one Unix socket: every frame is ``TYPE`` (1 byte) + ``LENGTH`` (4 bytes,
big-endian) + payload (``agent_wire``).

  host -> agent   R  JSON {"argv", "cwd", "env", "stdin": hex or null, "fresh": bool,
                           "keep": [[layer id, [paths]]...]}
                                              run a command ("fresh": empty /tmp and HOME
                                              after it, see ``empty_private_dirs``; "keep":
                                              the earlier layers it sees, see cow_layer)
                  G  (empty)                  go: run the command just accepted
                  K  (empty)                                               kill the command
                  C  (empty)                  copy the layer's changes out now, while the
                                              command runs (held writes: a gVisor kernel's
                                              cell has ended)
  agent -> host   H  JSON {"pid"}             ready (sent once, at start)
                  A  (empty)                  request accepted; runs only after the host's G
                  O / E  bytes                stdout / stderr of the command
                  X  JSON {"exit": N} or {"signal": N} or {"error": text}, with
                     "blocked": [[host, port]...] when the network is off and the
                     command's tools asked the relay for somewhere
                  L  JSON {"layer": "done", "layer_id": N} or {"layer": why not}
                                              the answer to C: what changed in the layer
                                              since its last copy is in STATUS_DIR/cell
                                              ("empty": true instead of an id: nothing)
                  D  JSON {} or {"tainted": why}
                                              after every X: what the command may have
                                              left outside /tmp and HOME is undone (and,
                                              for "fresh", /tmp and HOME emptied), or why
                                              the sandbox cannot be trusted any more. The
                                              host reads it before its next R, so this
                                              work is done while no one waits for it

Held writes (``--layer SETTING``, see ``cow_layer.py``, whose source runs before this
one's): a thread of the agent, the layer keeper, keeps the capabilities the layer needs
(capabilities are per thread; it sets ``PR_SET_KEEPCAPS`` before the agent takes its uids,
and raises them again only for its own work). Before each command is accepted it mounts a
fresh overlay over the working dir; after the command and everything it left have ended,
it copies the overlay's upper out to ``STATUS_DIR`` and the ``X`` report says
``"layer": "done"`` (or why not). A command never runs without its overlay: a keeper that
cannot mount ends the agent before the command is accepted.

The command gets its own pipes, never the agent's, so nothing it prints can be
taken for a frame. The agent seals itself off from the commands (``seal``):

- its real and saved uid are one of its own (``AGENT_UID``), while its effective
  uid stays the caller's, so files it touches are the caller's as before; a
  command (all three uids the caller's) may not signal it (EPERM, SIGKILL and
  SIGSTOP included), ptrace it or read its memory, and the agent is not dumpable;
- every fd it holds besides a command's own pipes is a socket, which cannot be
  opened again through ``/proc/1/fd`` (ENXIO), where a pipe could be;
- commands start with no capabilities in any set, the bounding set included.

Where the sandbox's stdio are pipes (Docker's), ``hide`` starts the agent in a
PID and mount namespace of its own, below a relay that holds the pipes and that
no command can see in ``/proc``. When a command ends (or is killed), every other process in
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
import queue
import re
import resource
import select
import signal
import socket
import stat
import sys
import threading
import time

# The wire (RUN, GO, KILL, HELLO, ..., MAX_FRAME, PIPE_SIZE, pack_frame, parse_header) is
# agent_wire.py's, whose source runs just before this one's: the host's side
# (gvisor_magic/agent_channel.py) imports it from there. Only functions use its names, so
# that the host can still import this module.

# Linux ABI numbers (the same on x86_64 and arm64).
PR_SET_DUMPABLE, PR_CAPBSET_DROP = 4, 24
CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Signals the agent ignores (faults stay fatal). A command may not signal it anyway (its
# uids differ); this covers its own children and the relay's.
FATAL = {"SIGKILL", "SIGSTOP", "SIGCHLD", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT",
         "SIGTRAP", "SIGSYS"}
IGNORED = [s for s in signal.valid_signals()
           if isinstance(s, signal.Signals) and s.name not in FATAL]
# Every signal a command starts with at its default (an ignored one would stay ignored).
RESET = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


def fail(why):
    os.write(2, ("gvisor-magic agent: %s\n" % why).encode(errors="replace"))
    os._exit(70)


def libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def drop_bounding_set():
    _, c = libc()
    for cap in range(64):
        c.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last one; EPERM if gone


def capability_sets():
    """(ctypes, libc, a capget/capset header for this thread, its two data halves)."""
    ctypes, c = libc()

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    return ctypes, c, Header(_LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()


def drop_capabilities():
    """No capability in any set, bounding included: an exec'd root shell gains none back."""
    drop_bounding_set()
    ctypes, c, header, empty = capability_sets()
    if c.capset(ctypes.byref(header), empty) != 0:
        fail("cannot drop capabilities (errno %d)" % ctypes.get_errno())
    with open("/proc/self/status") as status:
        left = [line.split()[0] for line in status
                if line.startswith(("CapPrm", "CapEff", "CapBnd", "CapAmb"))
                and int(line.split()[1], 16)]
    if left:
        fail("capabilities left after dropping them: " + ", ".join(left))


PR_SET_KEEPCAPS, PR_CAPBSET_READ = 8, 23
STATUS_DIR = "/run/gvisor-magic"  # the host's layout.STATUS_DIR
#: (requests, replies) of the layer keeper thread, when the writes are held.
KEEPER = None


def raise_effective():
    """This thread's effective capabilities := its permitted ones (the keeper's, after the
    agent's uid change cleared them)."""
    ctypes, c, header, data = capability_sets()
    if c.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for half in data:
        half.effective = half.permitted
    if c.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def start_keeper(setting):
    """Start the layer keeper thread (see the top); it prepares the layer before this
    returns. Called before ``seal``, while the agent is root of the sandbox."""
    global KEEPER
    requests, replies = queue.Queue(), queue.Queue()

    def keeper():
        ctypes, c = libc()
        if c.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            replies.put(("error", "PR_SET_KEEPCAPS failed (errno %d)" % ctypes.get_errno()))
            return
        try:
            layer = layer_prepare(setting)  # cow_layer.py's
        except OSError as exc:
            replies.put(("error", str(exc)))
            return
        layer["switch"] = False  # its effective uid is the caller's once the agent sealed
        replies.put(("ok", None))
        while True:
            operation, argument = requests.get()
            try:
                raise_effective()
                replies.put(("ok", operation(layer, *argument)))
            except Exception as exc:  # reported to the agent, which decides
                replies.put(("error", "%s: %s" % (type(exc).__name__, exc)))

    threading.Thread(target=keeper, name="layer-keeper", daemon=True).start()
    KEEPER = (requests, replies)
    status, value = replies.get()
    if status != "ok":
        fail("cannot prepare the copy-on-write layer: %s" % value)


def keeper_call(operation, *argument):
    """Run ``operation(layer, *argument)`` in the keeper thread; OSError if it failed."""
    requests, replies = KEEPER
    requests.put((operation, argument))
    status, value = replies.get()
    if status != "ok":
        raise OSError(value)
    return value


def agent_uid(caller):
    return 65534 if caller != 65534 else 65533


def take_own_uid(caller):
    """Real and saved uid the agent's own, effective uid the caller's (see the top)."""
    own = agent_uid(caller)
    if os.getresuid() != (own, caller, own):
        try:
            os.setresuid(own, caller, own)
        except OSError as exc:
            fail("cannot take a uid of the agent's own (%s)" % exc)


class AsCaller:
    """Real uid the caller's while a command is spawned, so that it starts with all three
    uids the caller's (exec makes the saved uid the effective one). Nothing else runs in
    the sandbox meanwhile: the previous command's processes are all gone."""

    def __enter__(self):
        os.setresuid(CALLER, -1, -1)

    def __exit__(self, *exc):
        os.setresuid(agent_uid(CALLER), -1, -1)


#: The uid commands run as (``--caller``); the agent starts as root of the sandbox.
CALLER = os.geteuid()


def seal():
    """Keep commands out of the agent (see the top of this file)."""
    for fd in (0, 1, 2):
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            fail("fd %d is not a socket: a command could open it again through /proc/1/fd" % fd)
    drop_bounding_set()  # first: it takes CAP_SETPCAP, effective only while euid is 0
    take_own_uid(CALLER)
    drop_capabilities()
    ctypes, c = libc()
    if c.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # after the uid change, which resets it
        fail("cannot make the agent non-dumpable (errno %d)" % ctypes.get_errno())
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)


def forget_environment():
    """Zero the environment this process started with, which gVisor lets any command read
    from its memory through ``/proc/1/environ`` (seen here 2026-12-07, runsc 20240729, the
    agent non-dumpable and of another uid). The same variables are set again, in memory
    that file does not show (``posix_spawnp`` searches this process's PATH)."""
    ctypes, c = libc()
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(c, "environ")
    index = 0
    while environ and environ[index]:
        ctypes.memset(environ[index], 0, c.strlen(ctypes.c_void_p(environ[index])))
        index += 1
    c.clearenv()
    for name, value in ENV.items():
        os.putenv(name, value)


def hide(gid):
    """PID 1 of a sandbox whose stdio are pipes (Docker's): start the agent in a PID and mount
    namespace of its own, with a fresh ``/proc`` in which nothing outside it exists, talking
    to this process over sockets; this process relays between them and the pipes. Needs
    CAP_SYS_ADMIN (namespaces, mounts), CAP_SETUID/CAP_SETGID (the caller's identity) and
    CAP_SETPCAP (to empty the bounding set), all dropped before any command runs."""
    ctypes, c = libc()
    channel, inner = socket.socketpair()
    errors, inner_errors = socket.socketpair()
    if c.unshare(CLONE_NEWPID) != 0:
        fail("cannot create a PID namespace (errno %d)" % ctypes.get_errno())
    child = os.fork()
    if child == 0:
        channel.close()
        errors.close()
        os.dup2(inner.fileno(), 0)
        os.dup2(inner.fileno(), 1)
        os.dup2(inner_errors.fileno(), 2)
        inner.close()
        inner_errors.close()
        if (c.unshare(CLONE_NEWNS) != 0
                or c.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0
                or c.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                           None) != 0):
            fail("cannot give the agent its own /proc (errno %d)" % ctypes.get_errno())
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
        except OSError as exc:
            fail("cannot take the caller's group %d (%s)" % (gid, exc))
        return  # the agent, sealed by main()
    inner.close()
    inner_errors.close()
    drop_capabilities()
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    relay(channel, errors, child)


def relay(channel, errors, child):
    """Copy host -> agent and agent -> host (and the agent's stderr) until the agent ends."""
    down, up = bytearray(), bytearray()  # bytes waiting for the agent / for the host
    host_open, agent_open, errors_open, shut = True, True, True, False
    for end in (channel, errors):
        end.setblocking(False)
    os.set_blocking(1, False)
    while agent_open or up:
        readers = [fd for fd, wanted in ((0, host_open and len(down) < PIPE_SIZE),
                                         (channel, agent_open and len(up) < PIPE_SIZE),
                                         (errors, errors_open)) if wanted]
        writers = ([channel] if down else []) + ([1] if up else [])
        ready_r, ready_w, _ = select.select(readers, writers, [])
        if 0 in ready_r:
            data = os.read(0, PIPE_SIZE)
            down += data
            host_open = bool(data)
        if channel in ready_r:
            try:
                data = channel.recv(PIPE_SIZE)
            except BlockingIOError:
                data = None
            if data == b"":
                agent_open = False
            elif data:
                up += data
        if errors in ready_r:
            try:
                data = errors.recv(65536)
                errors_open = bool(data)
                os.write(2, data)
            except (BlockingIOError, OSError):
                pass
        if channel in ready_w:
            try:
                del down[:channel.send(down)]
            except BlockingIOError:
                pass
            except OSError:
                down.clear()
        if 1 in ready_w:
            try:
                del up[:os.write(1, up)]
            except BlockingIOError:
                pass
            except OSError:
                break  # the host is gone
        if not host_open and not down and not shut:
            shut = True  # the host closed its end: so does the agent's
            try:
                channel.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    _, status = os.waitpid(child, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def send(kind, payload=b""):
    data = pack_frame(kind, payload)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(1, view):]
        except BlockingIOError:  # gVisor may hand over a non-blocking host socket
            select.select([], [1], [])


def read_exactly(fd, size):
    chunks = []
    while size:
        try:
            chunk = os.read(fd, size)
        except BlockingIOError:  # gVisor may hand over a non-blocking host socket
            select.select([fd], [], [])
            continue
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame():
    kind, size = parse_header(read_exactly(0, WIRE_HEADER.size))
    if size > MAX_REQUEST:
        raise EOFError
    return kind, read_exactly(0, size)


#: How long killing everything a command left may take before the sandbox is given up
#: (the host waits ``agent_channel.KILL_GRACE`` for a killed command's end). Seen here
#: 2026-12-07, runsc 20240729, 2 loaded cores: a fork bomb's 512 processes took up to 4 s
#: to stop, kill and reap; a few background processes take milliseconds.
KILL_BOUND = 10.0
#: How long the agent keeps reading a command's pipes once its main process has ended and
#: everything else was killed: what was written before is in the pipes, and nothing alive
#: holds them open, so this is only a bound.
DRAIN_BOUND = 1.0


def kill_everything_else():
    """Kill every process in the sandbox but this one (the command's whole tree), all of
    them at once and until none is left; why the sandbox can no longer be trusted, or "".

    ``kill(-1, SIG)`` signals every process the agent may signal (the caller's, which every
    command's process is) but the agent, in one pass of the kernel's process list. First
    SIGSTOP, twice (the second pass stops what was forked during the first): a stopped
    process neither forks nor ends, so a fork bomb's churn stops and the set holds still.
    Then SIGKILL, repeated (reaping what ended, re-parented orphans included) until nothing
    is left to signal (ESRCH). Killing one pid at a time from a list of the sandbox's
    processes never catches a process that forks and exits in a loop (seen here 2026-12-07:
    its command came back only at its timeout, and a fork bomb lost the session its
    sandbox)."""
    deadline = time.monotonic() + KILL_BOUND
    for _ in range(2):
        try:
            os.kill(-1, signal.SIGSTOP)
        except OSError:
            break
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            reap()
            return ""
        except PermissionError:  # only processes the agent may not signal are left
            reap(deadline)
            return "a process the agent cannot kill was left in the sandbox"
        reap(min(deadline, time.monotonic() + 0.2))  # the next pass comes soon
        if time.monotonic() > deadline:
            return "processes a command left could not all be killed"
        # Woken by SIGCHLD (the wake-up pair) as soon as one of them ends.
        select.select([WAKE[0]], [], [], 0.01)
        drain_wake()


def drain_wake():
    try:
        os.read(WAKE[0], 65536)  # one read: signals may keep coming
    except OSError:
        pass


IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0
#: More SysV IPC ids used by one command than this, and the sandbox is replaced instead.
IPC_SCAN_MAX = 4096


class SysvIpc:
    """Removes the SysV IPC objects a command made (message queues, semaphore sets, shared
    memory), which would otherwise outlive it. gVisor offers no way to list them (no
    ``/proc/sysvipc``; ``MSG_INFO`` answers 0), but it hands out each kind's ids in order
    (runsc 20240729: 1, 2, 3...): an object the agent makes and removes at once marks
    where a kind's ids stand, and every id between two marks was made by the command."""

    def __init__(self):
        self.ctypes, self.c = libc()
        self.marks = self.mark()

    def mark(self):
        c, size = self.c, self.ctypes.c_size_t
        made = [c.msgget(IPC_PRIVATE, IPC_CREAT | 0o600),
                c.semget(IPC_PRIVATE, 1, IPC_CREAT | 0o600),
                c.shmget(IPC_PRIVATE, size(4096), IPC_CREAT | 0o600)]
        for remove, ident in zip(self.removers(), made, strict=True):
            if ident >= 0:
                remove(ident)
        return made

    def removers(self):
        c = self.c
        return (lambda i: c.msgctl(i, IPC_RMID, None), lambda i: c.semctl(i, 0, IPC_RMID),
                lambda i: c.shmctl(i, IPC_RMID, None))

    def clean(self):
        """Remove what the last command made; why the sandbox cannot be trusted, or ""."""
        before, self.marks = self.marks, self.mark()
        for remove, start, end in zip(self.removers(), before, self.marks, strict=True):
            if start < 0 or end < 0:
                return "SysV IPC ids could not be marked"
            if end - start > IPC_SCAN_MAX or end < start:
                return "a command made more SysV IPC objects than can be removed"
            for ident in range(start + 1, end):
                if remove(ident) != 0 and self.ctypes.get_errno() not in (22, 43):
                    return "a command left a SysV IPC object that cannot be removed"
        return ""


IPC = None


def clean_between():
    """What a command may leave outside /tmp and HOME, undone: new files in /dev and
    /dev/shm, SysV IPC objects and POSIX message queues are removed; the mode, owner and
    extended attributes of /tmp, HOME, /dev, /dev/shm and /dev/mqueue and the modes of
    /dev's own nodes, the sandbox's writable ``/proc/sys`` settings, and this process's
    limits (``prlimit`` on PID 1), nice value, CPU affinity and ``oom_score_adj`` (which
    every later command would inherit) are brought back to what they were at start.
    Returns why the sandbox can no longer be trusted ("" when it can): a lowered hard
    limit, say, cannot be raised again without privileges."""
    for directory, base in (("/dev/shm", BASE_SHM), ("/dev", BASE_DEV)):
        try:
            names = os.listdir(directory)
            device = os.lstat(directory).st_dev
        except OSError:
            continue
        for name in names:
            if name not in base:
                _remove_tree(os.path.join(directory, name), device)
    tainted = IPC.clean() or clean_message_queues()
    for limit, value in BASE_LIMITS.items():
        try:
            if resource.getrlimit(limit) != value:
                resource.setrlimit(limit, value)
        except (OSError, ValueError):
            tainted = "a command lowered the sandbox's own limits (prlimit on PID 1)"
    return restore_process() or restore_files() or tainted


#: POSIX message queues outlive their command as SysV IPC objects do; the agent mounts
#: their filesystem here at start (as distributions do), while it still may, to list them.
MQUEUE = "/dev/mqueue"
MQUEUE_READY = False


def mount_message_queues():
    """Mount the sandbox's message queue filesystem on /dev/mqueue (needs CAP_SYS_ADMIN,
    dropped right after); False if it cannot be, and then every command retires its
    sandbox (its queues could not be found to remove them)."""
    points = mount_points() or {}
    if points.get(MQUEUE) == "mqueue":
        return True  # the runtime mounted it (Docker does)
    _, c = libc()
    try:
        os.makedirs(MQUEUE, 0o755, exist_ok=True)
    except OSError:
        return False
    return c.mount(b"mqueue", MQUEUE.encode(), b"mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   None) == 0


def clean_message_queues():
    if not MQUEUE_READY:
        return "POSIX message queues cannot be listed to remove them (no /dev/mqueue)"
    try:
        names = os.listdir(MQUEUE)
    except OSError:
        return "POSIX message queues could not be listed to remove them"
    if names:
        # gVisor lets no process without CAP_DAC_OVERRIDE remove a queue, its owner included
        # (mq_unlink: EACCES; the directory is r-x for all and cannot be chmod'ed; seen here
        # 2026-12-07, runsc 20240729), so one left behind retires the sandbox instead.
        ctypes, c = libc()
        for name in names:
            if c.mq_unlink(("/" + name).encode(errors="surrogateescape")) != 0 \
                    and ctypes.get_errno() != 2:  # ENOENT: gone already
                return "a command left a POSIX message queue, which only a privileged " \
                    "process can remove"
    return ""


#: What a command could change of this process and every later command would inherit
#: (a command runs as the caller, which is this process's effective uid; gVisor lets it
#: renice PID 1, set its affinity or write its /proc/1/oom_score_adj; seen here
#: 2026-12-07 with runsc 20240729: `renice -n 19 -p 1` left every later command at nice 19).
BASE_PROCESS = {}


def _read(path):
    """A small file's bytes in three syscalls (``open()`` makes seven: each costs here)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def process_state():
    return {"nice": os.getpriority(os.PRIO_PROCESS, 0), "cpus": os.sched_getaffinity(0),
            "oom_score_adj": _read("/proc/self/oom_score_adj").strip()}


def restore_process():
    try:
        now = process_state()
        if now == BASE_PROCESS:
            return ""
        if now["nice"] != BASE_PROCESS["nice"]:  # gVisor lets it be lowered again
            os.setpriority(os.PRIO_PROCESS, 0, BASE_PROCESS["nice"])
        if now["cpus"] != BASE_PROCESS["cpus"]:
            os.sched_setaffinity(0, BASE_PROCESS["cpus"])
        if now["oom_score_adj"] != BASE_PROCESS["oom_score_adj"]:
            _write("/proc/self/oom_score_adj", BASE_PROCESS["oom_score_adj"])
        if process_state() != BASE_PROCESS:
            raise OSError
    except OSError:
        return "a command changed the agent's nice value, CPU affinity or oom_score_adj"
    return ""


#: {path: (mode, uid, gid, extended attribute names)} of the sandbox's own directories a
#: command may chmod or setfattr (as their owner: HOME is the caller's), and, for a root
#: caller only, {path: (mode, uid, gid)} of /dev's nodes and {path: text} of the
#: /proc/sys settings it may write: root owns them, so it may, capabilities or not
#: (`ptrace_scope`, `ip_local_port_range`...); another uid may not (EACCES; seen here
#: 2026-12-07). Each check costs gVisor syscalls, so only what a command could change.
BASE_ROOTS, BASE_NODES, BASE_SYSCTL = {}, {}, {}


def _xattrs(path):
    try:
        return frozenset(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return frozenset()


def remember_files():
    points = mount_points() or {}
    for path in ("/tmp", ENV.get("HOME") or "/tmp", "/dev", "/dev/shm", MQUEUE):
        if points.get(path) in ("tmpfs", "devtmpfs", "mqueue") or path == "/dev":
            try:
                info = os.lstat(path)
            except OSError:
                continue
            BASE_ROOTS[path] = (info.st_mode, info.st_uid, info.st_gid, _xattrs(path))
    if CALLER != 0:
        return
    for name in BASE_DEV:
        path = os.path.join("/dev", name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISLNK(info.st_mode):
            BASE_NODES[path] = (info.st_mode, info.st_uid, info.st_gid)
    for directory, _, names in os.walk("/proc/sys"):
        for name in names:
            path = os.path.join(directory, name)
            try:
                if os.stat(path).st_mode & 0o222:
                    BASE_SYSCTL[path] = _read(path)
            except OSError:
                continue


def restore_files():
    try:
        for path, (mode, uid, gid, names) in BASE_ROOTS.items():
            _restore_mode(path, mode, uid, gid)
            for name in _xattrs(path) - names:
                os.removexattr(path, name, follow_symlinks=False)
        for path, (mode, uid, gid) in BASE_NODES.items():
            _restore_mode(path, mode, uid, gid)
    except OSError:
        return "a command changed the mode, owner or attributes of a directory of the sandbox"
    for path, value in BASE_SYSCTL.items():
        try:
            if _read(path) != value:
                _write(path, value)
        except OSError:
            return "a command changed " + path
    return ""


def _restore_mode(path, mode, uid, gid):
    info = os.lstat(path)
    if (info.st_uid, info.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)
    if info.st_mode != mode:
        os.chmod(path, stat.S_IMODE(mode))


def mount_points():
    """{mount point: its filesystem type}, the last mount on a point winning (the one seen),
    or None when the sandbox's mount table cannot be read."""
    points = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
            for line in table:
                fields = line.split()
                if "-" not in fields[6:]:
                    continue
                kind = fields[fields.index("-", 6) + 1]
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                points[point] = kind
    except (OSError, IndexError, ValueError):
        return None
    return points


def _remove_tree(path, device):
    """Remove ``path`` (a link itself, never its target), making the caller's own read-only
    or unreadable directories writable on the way (the caller owns all a command made),
    and never leaving the filesystem ``device``."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if info.st_dev != device:
        return
    if stat.S_ISDIR(info.st_mode):
        try:
            os.chmod(path, 0o700)
            names = os.listdir(path)
        except OSError:
            names = []
        for name in names:
            _remove_tree(os.path.join(path, name), device)
        try:
            os.rmdir(path)
        except OSError:
            pass
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _empty(directory, points, device):
    """Remove what is in ``directory`` on the filesystem ``device``, never entering a mount
    point (a working dir or repo bound below /tmp or HOME is the host's own files)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        path = entry.path
        if path in points:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_dev != device:
                continue
        except OSError:
            continue
        if any(point.startswith(path + "/") for point in points):
            if entry.is_dir(follow_symlinks=False):
                _empty(path, points, device)  # a parent the runtime made for a mount
            continue
        _remove_tree(path, device)


def empty_private_dirs():
    """Empty ``/tmp`` and ``HOME`` (their tmpfs only) for the next caller of a reused
    sandbox; why the sandbox can no longer be trusted, or ""."""
    try:
        return _empty_private_dirs()
    except (OSError, RecursionError, ValueError) as exc:  # a tree too deep, say
        return f"/tmp and HOME could not be emptied between calls ({exc.__class__.__name__})"


def _empty_private_dirs():
    points = mount_points()
    if points is None:
        return "the sandbox's mount table could not be read to empty /tmp and HOME"
    for directory in ("/tmp", ENV.get("HOME") or "/tmp"):
        if points.get(directory) != "tmpfs":
            continue  # not the private tmpfs (HOME is the working dir, say): keep it
        try:
            device = os.lstat(directory).st_dev
        except OSError:
            continue
        _empty(directory, points, device)
        left = [e.path for e in os.scandir(directory) if e.path not in points
                and not any(p.startswith(e.path + "/") for p in points)]
        if left:
            return f"{left[0]} could not be removed between calls"
    return ""


def reap(until=None):
    """Collect every ended child (or those that end before ``until``: while a command's
    processes keep ending and forking, "every" has no end), keeping their statuses (the
    command's is read later)."""
    while until is None or time.monotonic() < until:
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
        with AsCaller():
            pid = os.posix_spawnp(
                argv[0], argv, env, setsid=True,
                setsigdef=RESET,  # the agent ignores them, and exec would keep that
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


#: Shells whose ``-c '. /dev/fd/3'`` runs a script exactly as ``-c SCRIPT`` would: the
#: agent keeps one started, so a command pays no shell start-up (bash: ~35 ms in gVisor).
POSIX_SHELLS = ("sh", "dash", "bash", "ksh", "mksh", "zsh")
#: Read at start-up by these shells when set, so a shell started before the request was
#: read cannot honour them: such a request starts its own shell.
STARTUP_VARIABLES = ("BASH_ENV", "ENV")
READY = None  # (pid, stdin_w, stdout_r, stderr_r, ctl_w, env, cwd, shell): started ahead
#: The shell to start ahead of the next command: the one the last shell command used.
NEXT_SHELL = "sh"


def is_posix_shell(path):
    return os.path.basename(path) in POSIX_SHELLS


PROGRAMS = {}  # program()'s answers, by name


def program(name):
    """What ``name`` runs: (its name, size, mtime), PATH searched and links followed.

    ``sh`` and ``/bin/sh`` are one program even where ``/bin`` and ``/usr/bin`` are two
    bind mounts of one directory (Docker's layout), which paths alone would not show."""
    if name not in PROGRAMS:
        path = name
        if "/" not in name:
            for directory in ENV.get("PATH", os.defpath).split(os.pathsep):
                candidate = os.path.join(directory or ".", name)
                if os.access(candidate, os.X_OK):
                    path = candidate
                    break
        try:
            info = os.stat(path)
            PROGRAMS[name] = (os.path.basename(os.path.realpath(path)), info.st_size,
                              info.st_mtime_ns)
        except OSError:
            PROGRAMS[name] = (name,)
    return PROGRAMS[name]


def prestart():
    global READY
    if READY is not None:  # the last request never reached a command (bad cwd)
        return
    if KEEPER is not None:  # its overlay goes before the next command: not a cwd there
        os.chdir("/")
    try:
        cwd = os.getcwd()
    except OSError:  # the last command removed it (its working dir's subdirectory, say)
        os.chdir("/")
        cwd = "/"
    ctl_r, ctl_w = os.pipe()  # never fds 0-3 (stdio and the wakeup pipe come first)
    try:
        started = spawn([NEXT_SHELL, "-c", ". /dev/fd/3"], ENV, [(ctl_r, 3)])
    except OSError:
        os.close(ctl_w)
        return
    finally:
        os.close(ctl_r)
    READY = started + (ctl_w, dict(ENV), cwd, NEXT_SHELL)


#: A one-line script that is one program with plain words: ``sh -c``/``bash -c`` would exec
#: it in place of the shell, and so does the started shell (``exec``), saving a fork.
SIMPLE_COMMAND = re.compile(r"[A-Za-z0-9_./:@%+,-]+( +[A-Za-z0-9_./:@%+,=-]+)*")
#: Words a shell runs itself (bash's builtins and keywords, dash's are among them):
#: ``exec`` would look for a program of that name instead.
SHELL_WORDS = frozenset((
    ".", ":", "[", "alias", "bg", "bind", "break", "builtin", "caller", "cd", "command",
    "compgen", "complete", "compopt", "continue", "declare", "dirs", "disown", "echo",
    "enable", "eval", "exec", "exit", "export", "false", "fc", "fg", "getopts", "hash", "help",
    "history", "jobs", "kill", "let", "local", "logout", "mapfile", "popd", "printf", "pushd",
    "pwd", "read", "readarray", "readonly", "return", "set", "shift", "shopt", "source",
    "suspend", "test", "times", "trap", "true", "type", "typeset", "ulimit", "umask",
    "unalias", "unset", "wait", "if", "then", "else", "elif", "fi", "case", "esac", "for",
    "select", "while", "until", "do", "done", "in", "function", "time", "coproc"))


def as_exec(command, env):
    """``exec COMMAND`` when the shell's own ``-c`` would exec it too, else COMMAND.

    Only for a program found now on the PATH the command will search (a missing one keeps
    the shell's own "not found" message)."""
    if "PATH" not in env or not SIMPLE_COMMAND.fullmatch(command):
        return command
    first = command.split(" ", 1)[0]
    if first in SHELL_WORDS or "=" in first:
        return command
    path = env["PATH"]
    candidates = [first] if "/" in first else [
        os.path.join(directory or ".", first) for directory in path.split(os.pathsep)]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return "exec " + command
        if os.path.exists(candidate):  # found first but not runnable: the shell says why
            return command
    return command


def shell_name(name):
    return name.isidentifier() and name.isascii()


def quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def take_ready(spec):
    """The pre-started shell and the script to send it, if it can run this request."""
    global READY, NEXT_SHELL
    ready, READY = READY, None
    argv, env = spec["argv"], spec["env"]
    is_script = len(argv) == 3 and argv[1] == "-c" and is_posix_shell(argv[0])
    if is_script:
        NEXT_SHELL = argv[0]  # the next command most likely uses the same shell
    if ready is None:
        return None
    if is_script and program(argv[0]) == program(ready[7]):
        # (a script longer than an argument may be can only go this way)
        command = as_exec(argv[2], env)
    elif not argv[0].startswith("-") and not is_script:  # dash's exec takes no "--"
        command = "exec " + " ".join(map(quote, argv))  # statuses stay exact
    else:
        command = None
    if command is None or not all(map(shell_name, env)) or not all(map(shell_name, ready[5])) \
            or any(name in env for name in STARTUP_VARIABLES):
        for fd in ready[1:5]:
            os.close(fd)
        try:
            os.kill(ready[0], signal.SIGKILL)
        except OSError:
            pass
        return None
    line = ["exec 3<&-"]
    if is_script and os.path.basename(ready[7]) == "bash":  # as `bash -c SCRIPT` sets it
        line.append("BASH_EXECUTION_STRING=" + quote(command))
    if spec["cwd"] != ready[6] or KEEPER is not None:  # a new overlay: cd into it
        line.append("cd -P -- %s && unset OLDPWD || exit 126" % quote(spec["cwd"]))
    line += ["unset " + name for name in ready[5] if name not in env]
    line += ["export %s=%s" % (name, quote(value)) for name, value in env.items()
             if ready[5].get(name) != value]
    return ready, ("; ".join(line) + "; " + command).encode(errors="surrogateescape")


def feed(fd, data):
    """Write what ``fd`` takes now of ``data``; (fd, the rest), or (None, b"") once all
    went (or the reader is gone) and ``fd`` is closed."""
    try:
        data = data[os.write(fd, data[:65536]):]
    except OSError:
        data = b""
    if data:
        return fd, data
    os.close(fd)
    return None, b""


def run(request):
    """Run one request to its report (``X``); True once the report went."""
    spec = json.loads(request)
    spec["env"].update(EGRESS_ENV)  # the relay's address, whatever the request set
    if KEEPER is not None:
        try:
            keeper_call(layer_mount, spec.get("keep") or ())  # cow_layer.py's
        except OSError as exc:  # never a command without its layer: not accepted
            fail("cannot mount the copy-on-write layer: %s" % exc)
    send(ACCEPTED)
    # The fence: start only when the host says go. A host that gave up on this agent
    # (it stalled past the accept deadline) never does, and runs the command elsewhere.
    try:
        kind, _ = read_frame()
    except EOFError:
        return
    if kind != GO:
        return
    script = b""
    ctl_w = None
    try:
        os.chdir(spec["cwd"])
        taken = take_ready(spec)
        if taken is not None:
            (pid, in_w, out_r, err_r, ctl_w, _, _, _), script = taken
        else:
            pid, in_w, out_r, err_r = spawn(spec["argv"], spec["env"])
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        message = f"{spec['argv'][0]}: {exc.strerror}\n"
        send(STDERR, message.encode(errors="replace"))
        send(EXIT, json.dumps({"exit": code}).encode())
        return True
    pending = bytes.fromhex(spec["stdin"]) if spec.get("stdin") else b""
    if not pending:
        os.close(in_w)
        in_w = None
    streams = {out_r: STDOUT, err_r: STDERR}
    status = None
    killed = False
    tainted = ""
    drained_by = None  # once the command ended: when to stop waiting for its pipes' end
    while True:
        readers = list(streams) + [0, WAKE[0]]
        writers = [in_w] if in_w is not None else []
        if ctl_w is not None:
            writers.append(ctl_w)
        wait = 0.5 if drained_by is None else max(0.0, drained_by - time.monotonic())
        ready_r, ready_w, _ = select.select(readers, writers, [], wait)
        # A long script goes in pieces: the shell runs it while reading.
        if ctl_w is not None and ctl_w in ready_w:
            ctl_w, script = feed(ctl_w, script)
        if in_w is not None and in_w in ready_w:
            in_w, pending = feed(in_w, pending)
        for fd in ready_r:
            if fd == WAKE[0]:
                try:
                    os.read(fd, 4096)  # SIGCHLD arrived: check the child below
                except OSError:
                    pass
                continue
            if fd == 0:
                kind, _ = read_frame()
                if kind == KILL:
                    killed = True
                    tainted = tainted or kill_everything_else()
                elif kind == COPY_OUT:
                    send(COPIED, copy_out_now(status is None and not killed))
                continue
            chunk = os.read(fd, MAX_FRAME)
            if chunk:
                send(streams[fd], chunk)
                if drained_by is not None:  # only a wait for the end is bounded
                    drained_by = time.monotonic() + DRAIN_BOUND
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
                # What it left behind is killed now, so nothing holds its pipes open: what
                # was written to them before is read below, then they end.
                tainted = tainted or kill_everything_else()
                drained_by = time.monotonic() + DRAIN_BOUND
        if status is not None and (not streams or time.monotonic() >= drained_by):
            break
    for fd in (in_w, ctl_w, *streams):
        if fd is not None:
            os.close(fd)
    if streams and not tainted:
        tainted = "a command's output pipes stayed open after all its processes were killed"
    reap(time.monotonic() + DRAIN_BOUND)  # nothing is left unless the kill failed (tainted)
    REAPED.clear()
    if os.WIFSIGNALED(status):
        report = {"signal": os.WTERMSIG(status)}
    else:
        report = {"exit": os.WEXITSTATUS(status)}
    if killed:
        report["killed"] = True
    if KEEPER is not None:
        if tainted:  # something of the command may still write the layer
            report["layer"] = "not copied out: " + tainted
        else:
            try:
                report["layer_id"] = keeper_call(layer_copy_out, STATUS_DIR)  # cow_layer's
                report["layer"] = "done"
            except OSError as exc:
                report["layer"] = "not copied out: %s" % exc
    if tainted:
        report["tainted"] = tainted
    if EGRESS_ENV:
        tried = take_attempts()  # egress_relay.py's, put in front
        if tried:
            report["blocked"] = tried
    send(EXIT, json.dumps(report).encode())
    if not tainted:  # a tainted sandbox is replaced: nothing to undo
        SETTLE.append(bool(spec.get("fresh")))
    return True


#: Set by ``run`` once a command's report went: what ``settle`` has to undo before the next.
SETTLE = []


def settle():
    """After a command's report (``X``), before the next request is read: undo what the
    command may have left (``clean_between``; and for a ``fresh`` request,
    ``empty_private_dirs``), then say so (``D``) with why the sandbox can no longer be
    trusted, if it cannot. Done after the report, not before it, so a command's result
    does not wait for it; the host reads ``D`` before it sends the next request."""
    fresh = SETTLE.pop() if SETTLE else None
    tainted = ""
    if fresh is not None:
        tainted = clean_between()
        if fresh and not tainted:
            tainted = empty_private_dirs()
    send(SETTLED, json.dumps({"tainted": tainted} if tainted else {}).encode())


def copy_out_now(running):
    """The answer to ``C``: the layer's changes since its last copy, copied out to
    ``STATUS_DIR/cell`` while the command runs."""
    if KEEPER is None:
        report = {"layer": "not held: this sandbox writes its working dir directly"}
    elif not running:
        report = {"layer": "the command has ended: its writes come with its exit"}
    else:
        try:
            number = keeper_call(layer_copy_out,  # cow_layer.py's
                                 os.path.join(STATUS_DIR, CELL_COPY), True)
            report = {"layer": "done", "layer_id": number} if number is not None else {
                "layer": "done", "empty": True}  # nothing to read: no file written
        except OSError as exc:
            report = {"layer": "not copied out: %s" % exc}
    return json.dumps(report).encode()


WAKE = (-1, -1)
ENV = {}
#: The proxy variables of the sandbox's relay (``--egress``), given to every command.
EGRESS_ENV = {}
BASE_DEV, BASE_SHM, BASE_LIMITS = set(), set(), {}


def main():
    global WAKE, ENV
    global CALLER, NEXT_SHELL, EGRESS_ENV
    args = sys.argv[1:]
    # --caller UID [--hide GID] [--shell PATH] [--egress SETTING] [--layer SETTING]
    options = dict(zip(args[::2], args[1::2], strict=False))
    if "--caller" in options:
        CALLER = int(options["--caller"])
    if options.get("--shell") and is_posix_shell(options["--shell"]):
        NEXT_SHELL = options["--shell"]  # the session's shell: its first command is fast too
    if "--hide" in options:
        hide(int(options["--hide"]))
    global MQUEUE_READY
    MQUEUE_READY = mount_message_queues()
    if options.get("--layer"):
        start_keeper(options["--layer"])
    seal()
    # SIGCHLD wakes the select loop at once when a command exits (no polling delay).
    wake = socket.socketpair()  # not a pipe: see the top
    for end in wake:
        end.setblocking(False)
    WAKE = tuple(end.detach() for end in wake)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(WAKE[1])
    home = os.environ.get("HOME")
    if home:
        try:
            os.makedirs(home, 0o700, exist_ok=True)
        except OSError:
            pass
    ENV = dict(os.environ)
    forget_environment()
    egress = parse_egress(options.get("--egress", ""))  # egress_relay.py's
    if egress is not None:
        EGRESS_ENV = start_relay(egress)
        ENV.update(EGRESS_ENV)
    for directory, base in (("/dev/shm", BASE_SHM), ("/dev", BASE_DEV)):
        try:
            base.update(os.listdir(directory))
        except OSError:
            pass
    remember_files()
    BASE_PROCESS.update(process_state())
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            try:
                BASE_LIMITS[getattr(resource, name)] = resource.getrlimit(getattr(resource, name))
            except (OSError, ValueError):
                pass
    global IPC
    IPC = SysvIpc()
    send(HELLO, ("{\"pid\": %d}" % os.getpid()).encode())
    prestart()
    while True:
        try:
            kind, payload = read_frame()
        except EOFError:
            break
        if kind == RUN:
            reported = run(payload)
            if reported:
                settle()
            prestart()
        elif kind == COPY_OUT:  # came as the command ended: its exit report has its writes
            send(COPIED, copy_out_now(False))
        # a stray K between commands has nothing to kill
    kill_everything_else()
    sys.exit(0)


if __name__ == "__main__":
    main()
