#!/usr/bin/env python3
"""Install gVisor's runsc from a checkout: ``sudo python3 scripts/install_gvisor.py [--docker]``.

The installer is part of the package (``gvisor_magic.install``: ``gvisor-magic install`` once
the package is installed); this file runs it from the source tree, with nothing installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gvisor_magic.install import main

if __name__ == "__main__":
    sys.exit(main(prog="install_gvisor.py"))
