"""PID 1 of a one-shot sandbox: announce the start, run the command, record how it ended.

This file's source is passed to the sandbox's Python with ``-I -S -c`` (it is
never imported inside the sandbox), so it uses only built-in modules.

Why an init at all: ``runsc run`` reports a signal as ``128 + N``, which cannot
be told apart from ``exit(128 + N)``; the init writes the real wait status to a
status file. And it writes a start marker on stderr before the command exists,
which is the runner's proof of whether the command may have run: without the
marker, the sandbox failed before the command started and falling back is safe.

argv: MARKER STATUS_FILE PROGRAM [ARGS...]
"""

import os
import signal
import sys


def main() -> None:
    marker, status_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    home = os.environ.get("HOME")
    if home:
        try:
            os.makedirs(home, 0o700, exist_ok=True)
        except OSError:
            pass
    os.write(2, marker.encode())
    try:
        # posix_spawn (vfork underneath) instead of fork: copying this Python
        # process under gVisor costs tens of milliseconds per command.
        # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec:
        # give the command the defaults, as subprocess's restore_signals does.
        pid = os.posix_spawnp(argv[0], argv, os.environ,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except FileNotFoundError:
        os.write(2, f"{argv[0]}: command not found\n".encode(errors="replace"))
        os._exit(127)
    except OSError as exc:
        os.write(2, f"{argv[0]}: {exc.strerror}\n".encode(errors="replace"))
        os._exit(126)
    status = 0
    while True:
        # As PID 1 we also reap orphans; stop when our own child has ended.
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if done == pid:
            break
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        report, code = f"signal {number}", 128 + number
    else:
        code = os.WEXITSTATUS(status)
        report = f"exit {code}"
    if code < 128:
        os._exit(code)  # unambiguous: no status file needed
    try:
        with open(status_path, "w") as handle:
            handle.write(report)
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    main()
