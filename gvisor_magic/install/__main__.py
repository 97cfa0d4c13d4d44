"""``python -m gvisor_magic.install [--docker] [--check] [--method ...]``."""

import sys

from .runsc import main

sys.exit(main(prog="python -m gvisor_magic.install"))
