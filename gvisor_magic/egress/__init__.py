"""A sandbox's network: the policy (``policy.py``), the host's proxy (``proxy.py``), and
``SandboxNetwork``, what one sandbox needs of both, for every backend and session.

The sandbox itself never has a network (``--network=none``) unless the policy
is ``host``. Its PID 1 runs a relay (``sandboxed/egress_relay.py``) on the
sandbox's loopback, and the command's proxy variables point at it:

- network off: the relay answers every request with a 403 and notes where it
  wanted to go, so a result can say "pip tried pypi.org:443: the network is off";
- ``allow`` and ``public``: the relay passes each connection, as one stream of
  a channel over a single socket the host gave the sandbox's PID 1
  (``runsc run --pass-fd``, see ``mux.py``), to this sandbox's own proxy on the
  host, which alone decides. The host's end of the channel hands each stream to
  the proxy on the proxy's event loop: the proxy has no socket of its own. No
  host Unix socket is reachable from inside by its path, whatever the network:
  runsc never gets ``--host-uds=open``.
"""

from __future__ import annotations

from .policy import PRESETS, NetworkPolicy, PolicyError

__all__ = ["CHANNEL_FD", "PRESETS", "NetworkPolicy", "PolicyError"]

#: The descriptor number the channel to the host's proxy has in the sandbox's PID 1
#: (the relay moves it to a close-on-exec number before anything else starts).
CHANNEL_FD = 3
