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

argv: DEADLINE CALLER_PID PROGRAM [ARGS...]   (DEADLINE in seconds, 0 for none)
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def kill_tree():
    """Kill every process below this one, until none is left (orphans keep arriving)."""
    me = str(os.getpid())
    for _ in range(50):
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me:
                continue
            try:
                with open("/proc/%s/stat" % pid, "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me.encode():  # our children (orphans come to us)
                found.append(int(pid))
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reaped = False
        while True:
            try:
                done, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if done == 0:
                break
            reaped = True
        if not found and not reaped:
            return


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
    deadline, caller, argv = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
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
