"""Remove set-user-ID/set-group-ID bits a sandboxed command gave files in the working dir.

gVisor keeps a command away from the host, but the working directory is a
real host directory and the modes of the files written there are whatever the
command asked for. A command running as root (or as the notebook's user) can
copy a shell there and ``chmod u+s`` it: inside the sandbox the mount is
``nosuid``, but on the host anyone who can reach that directory would get the
owner's privileges by running it (seen with runsc 20240729, directly and as
Docker's runtime). So after every isolated command, the set-ID bits of regular
files changed since the command started are removed, and the result says so.
Files that had those bits before the command are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

log = logging.getLogger("gvisor_magic")

SETID_BITS = stat.S_ISUID | stat.S_ISGID
#: Directories larger than this are only partly checked (and a warning logged).
MAX_ENTRIES = 500_000
#: Filesystems with coarse timestamps: look a little before the start.
_SLACK = 2.0


def strip_new_setid(directory: str | None, since: float) -> list[str]:
    """Clear set-ID bits on regular files under ``directory`` changed after ``since``.

    ``since`` is a ``time.time()`` taken before the command started. Symlinks
    are never followed; each file is opened without following links and
    checked to be the same inode before its mode is changed.
    """
    if not directory:
        return []
    stripped: list[str] = []
    pending, seen = [directory], 0
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                log.warning("gvisor: stopped checking %s for set-ID files after %d entries",
                            directory, MAX_ENTRIES)
                return stripped
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                pending.append(entry.path)
            elif stat.S_ISREG(info.st_mode) and info.st_mode & SETID_BITS \
                    and info.st_ctime >= since - _SLACK and _clear(entry.path, info):
                stripped.append(entry.path)
    if stripped:
        log.warning("gvisor: removed set-ID bits a sandboxed command set on %s",
                    ", ".join(stripped[:20]))
    return stripped


def _clear(path: str, expected: os.stat_result) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return False
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (expected.st_dev, expected.st_ino):
            return False
        os.fchmod(fd, stat.S_IMODE(now.st_mode) & ~SETID_BITS)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
