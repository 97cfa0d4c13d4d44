"""Which network destinations a sandbox may reach, decided on the host.

A sandbox never has a network of its own (``runsc --network=none``). What it may
reach goes through a proxy on the host (``egress/proxy.py``), which asks this
module about every destination: a name and port before it resolves anything,
then every address the name resolved to, before it connects.

Modes:
  ``off``     nothing (the default); tools' attempts are still recorded, so a
              result can say what was tried
  ``allow``   only the hosts of an allowlist (presets and patterns)
  ``public``  any public address, through the proxy (``network=True``), and the
              hosts of an allowlist given with it (``--network public --allow-host
              127.0.0.1:8081``), which may then be reached as in ``allow``
  ``host``    the host's own network, unfiltered; only when asked for by name

Addresses that are not public (loopback, link-local such as the cloud metadata
service, private, unspecified, multicast, reserved) are refused in every mode
but ``host`` unless the allowlist names the address itself. A host name the user
wrote out exactly (not a preset, not a wildcard) may also resolve to a private
address (an internal package mirror); never to loopback or link-local, but for
``localhost`` itself, whose loopback addresses are what naming it means.

Standard library only: the policy is pure logic, tested without any network.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: The destinations a named preset stands for. Ports: 443 and 80 unless given.
PRESETS: dict[str, tuple[str, ...]] = {
    "pypi": ("pypi.org", "files.pythonhosted.org"),
    "npm": ("registry.npmjs.org", "registry.yarnpkg.com"),
    "github": ("github.com", "api.github.com", "codeload.github.com",
               "objects.githubusercontent.com", "raw.githubusercontent.com",
               "release-assets.githubusercontent.com"),
    "huggingface": ("huggingface.co", "cdn-lfs.huggingface.co", "cdn-lfs-us-1.huggingface.co",
                    "cas-bridge.xethub.hf.co", "*.hf.co"),
    "conda": ("conda.anaconda.org", "repo.anaconda.com", "*.anaconda.org"),
}
DEFAULT_PORTS = frozenset({80, 443})
MODES = ("off", "allow", "public", "host")

_NAME = re.compile(r"^(?:\*\.)?(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                   r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
#: One part of an IPv4 address as ``inet_aton`` reads it: decimal, octal or hex.
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")


class PolicyError(ValueError):
    """A network setting that cannot be read (the message says how to write it)."""


def canonical_host(host: str) -> str:
    """``host`` lower-cased, without a trailing dot or IPv6 brackets.

    Raises ``PolicyError`` for what is not a DNS name or a canonical IP literal:
    ``2130706433``, ``0177.0.0.1`` and ``0x7f.1`` resolve to 127.0.0.1 through
    ``inet_aton``, and a rule written ``127.0.0.1`` must not be met by them in
    disguise, nor a refusal of loopback be walked around with them.
    """
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.removesuffix(".")
    if not text or len(text) > 253:
        raise PolicyError(f"not a host name: {host!r}")
    if ":" in text:
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise PolicyError(f"not an IPv6 address: {host!r}") from None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if all(_NUMBER.fullmatch(part) for part in text.split(".")):
        raise PolicyError(f"{host!r} is an IP address in a non-canonical form "
                          "(write it as four decimal numbers, e.g. 127.0.0.1)")
    if not _NAME.match(text):
        raise PolicyError(f"not a host name: {host!r}")
    return text


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def address_class(address: str) -> str:
    """"public", or why the address is not (``"loopback"``, ``"link-local"``...)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for name, test in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if test:
            return name
    return "public" if ip.is_global else "reserved"


@dataclass(frozen=True)
class HostRule:
    """One allowlist entry: a name (``*.`` for any subdomain) or an IP, and its ports."""

    host: str
    ports: frozenset[int] = DEFAULT_PORTS
    #: Where it came from: a preset's name, or "" when the user wrote it out.
    preset: str = ""

    @classmethod
    def parse(cls, text: str, preset: str = "") -> HostRule:
        raw = text.strip()
        if not raw:
            raise PolicyError("an empty host in the network allowlist")
        if "://" in raw or "/" in raw:
            raise PolicyError(f"{text!r}: name a host, optionally with :port "
                              "(e.g. pypi.org or example.com:8443), not a URL")
        host, ports = raw, DEFAULT_PORTS
        match = re.fullmatch(r"(\[[^\]]+\]|[^:]+):(\d{1,5})", raw)
        if match:
            host, port = match.group(1), int(match.group(2))
            if not 0 < port < 65536:
                raise PolicyError(f"{text!r}: port {port} is out of range")
            ports = frozenset({port})
        elif raw.count(":") > 1 and not raw.startswith("["):
            pass  # a bare IPv6 address
        elif raw.startswith("[") and raw.endswith("]"):
            pass  # an IPv6 address in brackets, without a port
        elif ":" in raw:
            raise PolicyError(f"{text!r}: write a port as host:PORT, e.g. example.com:8443")
        wildcard = host.startswith("*.")
        name = canonical_host(host[2:] if wildcard else host)
        if wildcard and ip_of(name) is not None:
            raise PolicyError(f"{text!r}: a wildcard needs a domain name")
        return cls(("*." if wildcard else "") + name, ports, preset)

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    def matches(self, host: str, port: int) -> bool:
        if port not in self.ports:
            return False
        if self.wildcard:
            return host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        if self.ports == DEFAULT_PORTS:
            return shown
        return ",".join(f"{shown}:{port}" for port in sorted(self.ports))


@dataclass(frozen=True)
class Blocked:
    """A destination a command tried and did not reach."""

    host: str
    port: int
    reason: str
    #: How to allow it (``--network pypi allows it``), "" when nothing would.
    hint: str = ""
    count: int = 1

    def describe(self) -> str:
        where = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{where}:{self.port}: {self.reason}"
        if self.count > 1:
            text += f" ({self.count} attempts)"
        return text + (f"; {self.hint}" if self.hint else "")

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "reason": self.reason,
                "hint": self.hint, "count": self.count}


def summarize(attempts: Iterable[Blocked]) -> list[Blocked]:
    """One entry per (host, port, reason), in the order first seen, with counts."""
    merged: dict[tuple[str, int, str], Blocked] = {}
    for item in attempts:
        key = (item.host, item.port, item.reason)
        if key in merged:
            seen = merged[key]
            merged[key] = Blocked(seen.host, seen.port, seen.reason, seen.hint,
                                  seen.count + item.count)
        else:
            merged[key] = item
    return list(merged.values())


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


@dataclass(frozen=True)
class NetworkPolicy:
    """What one sandbox may reach. Build it with ``NetworkPolicy.parse``."""

    mode: str = "off"
    rules: tuple[HostRule, ...] = ()
    #: The presets named, in the order given (for messages).
    presets: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, value: object) -> NetworkPolicy:
        """``False`` | ``True`` | ``"host"`` | a preset or host | a list of them, or a
        string of them separated by commas or spaces."""
        if isinstance(value, NetworkPolicy):
            return value
        if value is None or value is False:
            return cls()
        if value is True:
            return cls("public")
        if isinstance(value, str):
            words = [w for w in re.split(r"[,\s]+", value) if w]
            if len(words) == 1 and words[0].lower() in ("off", "none", "false", "0", "no"):
                return cls()
            if len(words) == 1 and words[0].lower() in ("public", "on", "true", "1", "yes"):
                return cls("public")
            if len(words) == 1 and words[0].lower() == "host":
                return cls("host")
            value = words
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise PolicyError(f"network must be False, True, 'host', a preset "
                              f"({', '.join(PRESETS)}) or a list of hosts, got {value!r}")
        return cls.allowing(value)

    @classmethod
    def allowing(cls, entries: Iterable[object]) -> NetworkPolicy:
        rules: list[HostRule] = []
        presets: list[str] = []
        for entry in entries:
            if not isinstance(entry, str):
                raise PolicyError(f"a network allowlist holds host names, got {entry!r}")
            name = entry.strip().lower()
            if name in ("host", "public", "off"):
                raise PolicyError(f"{entry!r} cannot be combined with hosts: use it alone "
                                  "(hosts add to 'public' through --allow-host)")
            if name in PRESETS:
                presets.append(name)
                rules += [HostRule.parse(h, name) for h in PRESETS[name]]
            else:
                rules.append(HostRule.parse(entry))
        if not rules:
            return cls()
        return cls("allow", tuple(dict.fromkeys(rules)), tuple(dict.fromkeys(presets)))

    def combined(self, hosts: Sequence[str]) -> NetworkPolicy:
        """This policy with ``hosts`` allowed too (``--allow-host``): an allowlist grows,
        ``off`` becomes one, ``public`` keeps the public internet and may reach these
        hosts as an allowlist would (a loopback or private address it names, say).
        ``host`` reaches all of them already and stays as it is."""
        if not hosts:
            return self
        extra = NetworkPolicy.allowing(hosts)
        if self.mode == "host":
            return self
        return NetworkPolicy("public" if self.mode == "public" else "allow",
                             tuple(dict.fromkeys(self.rules + extra.rules)),
                             tuple(dict.fromkeys(self.presets + extra.presets)))

    # -- what it means ---------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether the command can reach any network at all."""
        return self.mode != "off"

    @property
    def proxied(self) -> bool:
        """Whether destinations go through the host's proxy (``allow`` and ``public``)."""
        return self.mode in ("allow", "public")

    def names_loopback(self) -> bool:
        """Whether a rule names a loopback address (then ``localhost`` inside the sandbox
        is not the sandbox's own, for proxied tools)."""
        for rule in self.rules:
            ip = ip_of(rule.host)
            if rule.host == "localhost" or (ip is not None and ip.is_loopback):
                return True
        return False

    def decide_name(self, host: str, port: int) -> tuple[Decision, HostRule | None]:
        """The verdict on a destination before it is resolved, and the rule that allows
        it: of all that match, the one that allows the most addresses (an IP literal,
        then a name written out, then a preset or wildcard)."""
        if self.mode == "off":
            return Decision(False, "the network is off"), None
        if self.mode == "host":
            return Decision(True), None
        matching = [rule for rule in self.rules if rule.matches(host, port)]
        if matching:
            return Decision(True), min(matching, key=_reach)
        if self.mode == "public":
            return Decision(True), None
        named = [r for r in self.rules if r.matches(host, next(iter(r.ports)))]
        if named:
            ports = sorted({p for r in named for p in r.ports})
            return Decision(False, f"port {port} is not allowed for {host} "
                                   f"(allowed: {', '.join(map(str, ports))})"), None
        return Decision(False, "not on the allowlist"), None

    def decide_address(self, host: str, address: str, rule: HostRule | None) -> Decision:
        """The verdict on one address ``host`` resolved to, given the rule that let the
        name through (None in ``public`` mode)."""
        if self.mode == "host":
            return Decision(True)
        kind = address_class(address)
        if kind == "public":
            return Decision(True)
        literal = rule is not None and ip_of(rule.host) is not None
        if literal:
            return Decision(True)
        exact = rule is not None and not rule.preset and not rule.wildcard
        if exact and (kind == "private" or (kind == "loopback" and host == "localhost")):
            return Decision(True)
        return Decision(False, f"{host} resolves to {address}, a {kind} address "
                               "(allowed only when the allowlist names that address)")

    def decide(self, host: str, port: int, addresses: Sequence[str]) -> Decision:
        """The whole path the proxy takes for ``host:port`` resolving to ``addresses``:
        allowed when the name is and at least one address is (it connects to those)."""
        verdict, rule = self.decide_name(host, port)
        if not verdict.allowed:
            return verdict
        refusals = []
        for address in addresses:
            verdict = self.decide_address(host, address, rule)
            if verdict.allowed:
                return verdict
            refusals.append(verdict)
        return refusals[0] if refusals else Decision(False, f"{host} has no address")

    def describe(self) -> str:
        if self.mode == "off":
            return "off"
        if self.mode == "host":
            return "HOST NETWORK (unfiltered, as the host itself)"
        named = list(self.presets)
        named += [str(r) for r in self.rules if not r.preset]
        if self.mode == "public":
            text = "public internet through the host's filtering proxy"
            return text + (", and: " + ", ".join(named) if named else "")
        return "allowlist: " + ", ".join(named)

    def hint(self, host: str, port: int, addresses: Sequence[str] = ()) -> str:
        """How to allow ``host:port``, for a message about a refused attempt; "" when
        nothing but the host's whole network would.

        Each suggestion is tried on this policy before it is made: a hint never names
        what would be refused too. ``addresses`` are those the name resolved to, when
        the refusal was about them; a refusal of the name itself is hinted at from the
        name alone (a refused name is never resolved), so what it resolves to is
        checked only once it is allowed. A link-local destination (the cloud metadata
        service) gets no hint: allowing it should be a decision, not a suggestion.
        """
        ip = ip_of(host)
        if addresses:
            seen = list(addresses)
        elif ip is not None:
            seen = [host]
        elif host == "localhost":
            seen = ["127.0.0.1", "::1"]
        else:
            seen = []
        if any(address_class(a) == "link-local" for a in seen):
            return ""

        def works(policy: NetworkPolicy) -> bool:
            if seen:
                return policy.decide(host, port, seen).allowed
            return policy.decide_name(host, port)[0].allowed

        if works(self):
            return ""
        for preset, hosts in PRESETS.items():
            # "--network PRESET" alone, or added to what is given: it must work both ways
            if (preset not in self.presets
                    and any(HostRule.parse(p, preset).matches(host, port) for p in hosts)
                    and works(self.combined([preset])) and works(NetworkPolicy.parse(preset))):
                return f"--network {preset} allows it"
        shown = f"[{host}]" if ":" in host else host
        target = shown if port in DEFAULT_PORTS else f"{shown}:{port}"
        try:
            if works(self.combined([target])):
                return f"--allow-host {target} allows it"
        except PolicyError:  # not a name a rule can hold
            pass
        return ""


def _reach(rule: HostRule) -> int:
    """How many kinds of address a rule lets its name reach; lower is more."""
    if ip_of(rule.host) is not None:
        return 0
    return 2 if rule.preset or rule.wildcard else 1
