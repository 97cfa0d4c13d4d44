"""PID 1 of a one-shot sandbox: announce the start, run the command, record how it ended.

This file's source is passed to the sandbox's Python with ``-I -S -c`` (it is
never imported inside the sandbox), so it uses only built-in modules.

Why an init at all: ``runsc run`` reports a signal as ``128 + N``, which cannot
be told apart from ``exit(128 + N)``; the init writes the real wait status to a
status file. Before the command exists it creates ``started`` next to that file
(in a directory only the host and this sandbox see): the runner's proof of
whether the command may have run. Without it, the sandbox failed before the
command started and trying elsewhere is safe; with it, never. Nothing on a
shared stream can fake that (runsc's own debug output goes to stderr too). The
start marker it then writes on stderr only tells the host where the sandbox's
messages end and the command's output begins.

A backstop for a caller that died (SIGKILL, say): at ``DEADLINE`` seconds (0:
none) the init kills every process of the sandbox and ends it, so a sandbox
never outlives its timeout by more than the host's grace.

The network: with EGRESS set (see ``egress_relay.parse_egress``, whose source
is put in front of this one) a relay serves an HTTP proxy on the sandbox's
loopback before the command starts, and the command's environment points at
it. Destinations asked for while the network is off are written to
``egress`` next to the status file.

Held writes: with LAYER set (see ``cow_layer.py``, whose source is put in front of this
one), the init starts as root of the sandbox, mounts the copy-on-write layer over the
working dir, becomes the caller, and after the command ends kills what it left and
copies the layer out next to the status file. Without LAYER it starts as the caller.

argv: MARKER STATUS_FILE DEADLINE EGRESS LAYER PROGRAM [ARGS...]
"""

# _signal, not signal: signal imports enum, about 11 ms of the init inside gVisor.
import _signal as signal
import os
import sys


def main() -> None:
    marker, status_path, deadline, egress, layer = sys.argv[1:6]
    argv = sys.argv[6:]
    if layer:
        try:
            layer = layer_start(layer)  # noqa: F821 (defined by cow_layer.py, put in front)
            os.chdir(os.getcwd())  # the working dir as the overlay shows it
            layer_become_caller(layer)  # noqa: F821
        except OSError as exc:
            os.write(2, f"gvisor-magic init: cannot hold the command's writes: {exc}\n"
                     .encode(errors="replace"))
            os._exit(125)
    home = os.environ.get("HOME")
    if home:
        try:
            os.makedirs(home, 0o700, exist_ok=True)
        except OSError:
            pass
    egress = parse_egress(egress)  # noqa: F821 (defined by egress_relay.py, put in front)
    if egress is not None:
        try:
            os.environ.update(start_relay(egress))  # noqa: F821
        except OSError as exc:
            os.write(2, f"gvisor-magic init: cannot start the network relay: {exc}\n".encode())
            os._exit(125)
    try:
        os.close(os.open(os.path.join(os.path.dirname(status_path), "started"),
                         os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:  # without the proof, the command must not start at all
        os.write(2, f"gvisor-magic init: cannot record the start: {exc}\n".encode())
        os._exit(125)
    if float(deadline) > 0:
        signal.signal(signal.SIGALRM, _deadline)
        signal.setitimer(signal.ITIMER_REAL, float(deadline))
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
    if layer:
        layer_end_processes(layer)  # noqa: F821
        try:
            layer_copy_out(layer, os.path.dirname(status_path))  # noqa: F821
        except OSError as exc:  # no "done": the host takes nothing from the layer
            os.write(2, f"gvisor-magic init: cannot copy the writes out: {exc}\n"
                     .encode(errors="replace"))
        _as_caller(layer)  # noqa: F821
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        report, code = f"signal {number}", 128 + number
    else:
        code = os.WEXITSTATUS(status)
        report = f"exit {code}"
    if egress is not None and not egress.get("socket"):
        tried = take_attempts()  # noqa: F821
        if tried:
            _write(os.path.join(os.path.dirname(status_path), "egress"),
                   attempts_text(tried))  # noqa: F821
    if code < 128:
        os._exit(code)  # unambiguous: no status file needed
    _write(status_path, report)
    os._exit(code)


def _write(path, text):
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError:
        pass


def _deadline(*_: object) -> None:
    """The caller is gone or stuck: end everything in the sandbox, as a timeout would."""
    try:
        os.kill(-1, signal.SIGKILL)  # from PID 1: every other process of the sandbox
    except OSError:
        pass
    os._exit(124)


if __name__ == "__main__":
    main()
