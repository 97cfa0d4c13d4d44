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


def clear_setid(path: str, expected: os.stat_result) -> bool:
    """Clear the set-ID bits of ``path`` if it is still the file ``expected`` describes.

    The file is opened without following links and checked to be the same inode
    before its mode changes. The walk that finds such files is ``gvisor_magic.postrun``.
    """
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
