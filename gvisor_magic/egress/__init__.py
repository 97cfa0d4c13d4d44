"""A sandbox's network: the policy (``policy.py``), the host's proxy (``proxy.py``), and
``SandboxNetwork``, what one sandbox needs of both, for every backend and session.

The sandbox itself never has a network (``--network=none``) unless the policy
is ``host``. Its PID 1 runs a relay (``sandboxed/egress_relay.py``) on the
sandbox's loopback, and the command's proxy variables point at it:

- network off: the relay answers every request with a 403 and notes where it
  wanted to go, so a result can say "pip tried pypi.org:443: the network is off";
- ``allow`` and ``public``: the relay passes each connection through a Unix
  socket (``runsc --host-uds=open``) to this sandbox's own proxy on the host,
  which alone decides.
"""

from __future__ import annotations

from .policy import PRESETS, NetworkPolicy, PolicyError

__all__ = ["EGRESS_DIR", "PRESETS", "SOCKET_NAME", "NetworkPolicy", "PolicyError"]

#: Where the proxy's socket appears inside the sandbox (a read-only bind of its directory).
EGRESS_DIR = "/run/gvisor-magic-egress"
SOCKET_NAME = "proxy.sock"
