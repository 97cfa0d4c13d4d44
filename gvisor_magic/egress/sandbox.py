"""``SandboxNetwork``: what one sandbox needs of the policy and the proxy, for every
backend and session (see the package's docstring)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import CHANNEL_FD
from .policy import Blocked, NetworkPolicy, summarize

if TYPE_CHECKING:
    from .mux import Channel
    from .proxy import EgressProxy
#: What is kept of one command's attempts while the network is off.
_ATTEMPTS_READ_MAX = 16 * 1024
_LOOPBACK = "localhost,127.0.0.1,::1"


def relay_attempts(text: str, policy: NetworkPolicy) -> list[Blocked]:
    """What the sandbox's relay says was tried while the network was off (``host port``
    lines). It comes from inside the sandbox: only well-formed lines are kept, and only
    to be shown."""
    found = []
    for line in text[:_ATTEMPTS_READ_MAX].splitlines()[:64]:
        match = re.fullmatch(r"([A-Za-z0-9._:-]{1,253}) (\d{1,5})", line.strip())
        if match and 0 < int(match.group(2)) < 65536:
            host, port = match.group(1).lower(), int(match.group(2))
            found.append(Blocked(host, port, "the network is off", policy.hint(host, port)))
    return summarize(found)


def agent_attempts(items: object) -> str:
    """A warm sandbox's agent reports attempts as JSON ``[[host, port]...]``: the same
    ``host port`` lines as the init's file, whatever shape the list really has."""
    if not isinstance(items, list):
        return ""
    return "".join(f"{item[0]} {item[1]}\n" for item in items[:64]
                   if isinstance(item, list) and len(item) == 2
                   and isinstance(item[0], str) and isinstance(item[1], int))


def relay_setting(policy: NetworkPolicy) -> str:
    """What a sandbox's PID 1 is told (``egress_relay.parse_egress``): no relay for the
    host's network; else the descriptor of its channel to the proxy (none: the network
    is off) and ``NO_PROXY``.

    Loopback stays the sandbox's own (a server a command starts inside) unless the policy
    names a loopback address: then proxied tools reach the host's.
    """
    if policy.mode == "host":
        return ""
    channel = str(CHANNEL_FD) if policy.proxied else ""
    return f"{channel}\t{'' if policy.names_loopback() else _LOOPBACK}"


class SandboxNetwork:
    """One sandbox's network on the host: its proxy (when it has one) and the channel that
    hands it the sandbox's connections (``mux.Channel``, on the proxy's own event loop: the
    proxy has no socket, and nothing is created on disk), what runsc passes to the
    sandbox's PID 1, and the setting it gets.

    Use: ``start()`` before the sandbox starts; give ``run_args()`` to ``runsc run`` and
    ``pass_fds`` to the ``Popen`` that starts it, then ``sandbox_started()``;
    ``close()`` after it ended.
    """

    def __init__(self, policy: NetworkPolicy, run_dir: str, label: str = "") -> None:
        self.policy = policy
        self.run_dir = run_dir
        self.proxy: EgressProxy | None = None
        self.channel: Channel | None = None
        self.label = label

    def start(self) -> SandboxNetwork:
        if not self.policy.proxied:
            return self
        from .mux import Channel  # asyncio: imported only when a proxy is needed
        from .proxy import EgressProxy

        self.proxy = EgressProxy(self.policy, label=self.label).start()
        self.channel = Channel(self.proxy.serve, self.label).start()
        return self

    def close(self) -> None:
        """Stop the channel and the proxy (idempotent); the proxy's record stays readable."""
        if self.channel is not None:
            self.channel.close()
        if self.proxy is not None:
            self.proxy.close()

    # -- what the sandbox is given ----------------------------------------------

    @property
    def runsc_network(self) -> str:
        """runsc's ``--network``: the host's stack only for ``host``."""
        return "host" if self.policy.mode == "host" else "none"

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The host's descriptors the process that starts ``runsc run`` must keep open."""
        return (self.channel.sandbox_fd,) if self.channel is not None else ()

    def run_args(self) -> list[str]:
        """``runsc run``'s own flags: the channel's end, as ``CHANNEL_FD`` of PID 1."""
        return [f"--pass-fd={fd}:{CHANNEL_FD}" for fd in self.pass_fds]

    def sandbox_started(self) -> None:
        """runsc holds the sandbox's end of the channel now (or never will): close ours."""
        if self.channel is not None:
            self.channel.sandbox_started()

    def relay_setting(self) -> str:
        """The PID 1's setting (``egress_relay.parse_egress``)."""
        return relay_setting(self.policy)

    # -- what happened ----------------------------------------------------------

    def mark(self) -> int:
        return self.proxy.mark() if self.proxy is not None else 0

    def blocked(self, mark: int = 0, relay_text: str = "") -> list[Blocked]:
        """What was refused since ``mark``: the proxy's record, or the relay's report."""
        if self.proxy is not None:
            return self.proxy.blocked_since(mark)
        if relay_text and self.policy.mode == "off":
            return relay_attempts(relay_text, self.policy)
        return []
