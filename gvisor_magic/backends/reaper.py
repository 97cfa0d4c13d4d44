"""Between the caller and an unisolated command (Linux): a subreaper that owns its whole tree.

Its source is run by the host's Python with ``-I -S -c`` and uses only built-in
modules. ``setsid`` lets a child leave the command's process group, and a child
whose parent exits is re-parented away from the command: neither can then be
found from the command's pid. As a *child subreaper* (``PR_SET_CHILD_SUBREAPER``)
this process receives every orphan of the tree instead of init, so:

- when the command exits, it kills and reaps everything the command left, then
  exits with the command's own status (a signal is re-raised on itself);
- on SIGTERM (the caller's timeout or interrupt) it kills the whole tree first;
- if the caller dies (``PR_SET_PDEATHSIG``) or the deadline passes (the timeout
  plus a grace, for a caller that cannot act), it does the same.

argv: DEADLINE CALLER_PID REPORT_FD PROGRAM [ARGS...]   (DEADLINE in seconds, 0 for none;
REPORT_FD an inherited pipe that gets one line, ``left`` and the pids that could not be
killed, or ``-`` for none)

Killing is by descent, not by marks a process could drop: every round collects all live
descendants of this process (by parent pid, in /proc), SIGKILLs them together and reaps what
comes back, until a round finds none, for at most ``KILL_BOUND`` seconds. A process whose
parent is killed in the same round is re-parented here and found by the next. (Seen here
2026-12-07: killing only the direct children, one round per level, left 71 of a 120-level
chain of setsid+fork processes running after 50 rounds.)
"""

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
#: Seconds the kill may take before what is left is reported as not killed.
KILL_BOUND = 5.0
REPORT = [-1]


def descendants():
    """Live (not zombie) processes below this one, by parent pid."""
    children = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % pid, "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(pid), fields[0] == b"Z"))
    found, todo = [], [os.getpid()]
    while todo:
        for pid, zombie in children.get(todo.pop(), ()):
            if not zombie:
                found.append(pid)
            todo.append(pid)
    return found


def reap():
    while True:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if done == 0:
            return


def kill_tree():
    """Kill every process below this one, until none is left (orphans keep arriving);
    report what could not be killed within ``KILL_BOUND``."""
    deadline = time.monotonic() + KILL_BOUND
    while True:
        found = descendants()
        if not found or time.monotonic() > deadline:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap()
        time.sleep(0.002)  # let the kernel finish the exits just signalled
    reap()
    if REPORT[0] >= 0:
        try:
            os.write(REPORT[0], ("left %s\n" % " ".join(map(str, found))).encode())
            os.close(REPORT[0])
        except OSError:
            pass
        REPORT[0] = -1


def stop(*_):
    """The caller's kill (or its death, or the deadline): the tree goes, then this process,
    by SIGKILL as the command's own group would have."""
    kill_tree()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    deadline, caller, argv = float(sys.argv[1]), int(sys.argv[2]), sys.argv[4:]
    if sys.argv[3] != "-":
        REPORT[0] = int(sys.argv[3])
        os.set_inheritable(REPORT[0], False)  # the command must not hold it
    if os.getppid() != caller:  # the caller died before PR_SET_PDEATHSIG was in place
        os._exit(125)
    if deadline > 0:
        signal.setitimer(signal.ITIMER_REAL, deadline)
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM))
    except FileNotFoundError:
        sys.stderr.write("%s: command not found\n" % argv[0])
        os._exit(127)
    except OSError as exc:
        sys.stderr.write("%s: %s\n" % (argv[0], exc.strerror))
        os._exit(126)
    while True:
        try:
            done, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if done == pid:
            break
    kill_tree()
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            signal.signal(number, signal.SIG_DFL)  # SIGKILL needs (and takes) none
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
