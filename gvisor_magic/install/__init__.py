"""Installing gVisor's runsc and registering it with Docker: ``gvisor-magic install``.

Stdlib only, like everything it imports, so ``python -m gvisor_magic.install`` runs in a
bare image or before the package's dependencies are installed (``import gvisor_magic``
imports nothing else until asked).
"""

import shlex
import sys

from .runsc import main

__all__ = ["command", "main"]


def command(*options: str) -> str:
    """The install command as this very Python runs it, for fix hints: a user who only ran
    ``pip install gvisor-magic`` has it (``sudo`` may not find a venv's ``gvisor-magic``)."""
    return " ".join(["sudo", shlex.quote(sys.executable), "-m", "gvisor_magic.install",
                     *options])
