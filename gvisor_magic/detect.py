"""What kind of place this is, and which backend ``auto`` should prefer here.

Cheap facts (platform, container, Kubernetes, whether we are already inside
gVisor) are read from files and variables; whether a backend works is only
ever established by running something real (``Backend.probe``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from dataclasses import dataclass

from . import registry

GVISOR_KERNEL_RELEASE = "4.4.0"
#: What a pod with ``runtimeClassName: gvisor`` gets instead of a sandbox per command.
POD_GVISOR_NOTE = (
    "this pod already runs under gVisor: runsc cannot start a sandbox inside it, so "
    "commands run in the pod's own gVisor sandbox, shared with the kernel (its files, "
    "environment and network); the node's kernel stays protected")
_CGROUP_HINTS = ("docker", "kubepods", "containerd", "libpod", "crio", "lxc", "garden")


@dataclass(frozen=True)
class BackendStatus:
    """The outcome of probing one backend on this machine."""

    name: str
    available: bool
    isolated: bool
    #: Why it is (not) usable, in words a user can act on.
    reason: str
    #: What to do about it, when it is not usable.
    fix: str | None = None
    version: str | None = None
    details: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HostFacts:
    """Facts that need no probe: where this Python process itself runs."""

    platform: str
    machine: str
    is_linux: bool
    is_root: bool
    in_container: bool
    in_kubernetes: bool
    pod_runs_gvisor: bool
    #: What made us believe we are in a container (file names, cgroup lines...).
    evidence: tuple[str, ...] = ()


def inside_gvisor() -> bool:
    """True when this process itself runs under gVisor (fixed kernel release 4.4.0)."""
    return sys.platform.startswith("linux") and platform.release() == GVISOR_KERNEL_RELEASE


def host_facts() -> HostFacts:
    is_linux = sys.platform.startswith("linux")
    evidence: list[str] = []
    in_kubernetes = False
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        evidence.append("KUBERNETES_SERVICE_HOST is set")
        in_kubernetes = True
    if os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"):
        evidence.append("a Kubernetes service-account directory exists")
        in_kubernetes = True
    for marker in ("/.dockerenv", "/run/.containerenv"):
        if os.path.exists(marker):
            evidence.append(f"{marker} exists")
    if is_linux:
        evidence.extend(_cgroup_evidence())
        runtime = os.environ.get("container")  # noqa: SIM112 (systemd's lower-case name)
        if runtime:
            evidence.append(f"container={runtime} is set")
    release = platform.release()
    # gVisor reports a fixed 4.4.0 release; no real host kernel of that age runs today.
    pod_runs_gvisor = is_linux and release == GVISOR_KERNEL_RELEASE
    if pod_runs_gvisor:
        evidence.append(f"kernel release {release} is gVisor's")
    return HostFacts(
        platform=sys.platform, machine=platform.machine(), is_linux=is_linux,
        is_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        in_container=bool(evidence) or pod_runs_gvisor, in_kubernetes=in_kubernetes,
        pod_runs_gvisor=pod_runs_gvisor, evidence=tuple(evidence))


def _cgroup_evidence() -> list[str]:
    found = []
    for path in ("/proc/1/cgroup", "/proc/self/cgroup"):
        try:
            with open(path) as handle:
                text = handle.read()
        except OSError:
            continue
        for line in text.splitlines():
            if any(hint in line for hint in _CGROUP_HINTS):
                found.append(f"{path}: {line.strip()}")
                break
        if found:
            break
    try:
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/" and " - overlay " in line:
                    found.append("the root filesystem is an overlay (container image)")
                    break
    except OSError:
        pass
    return found


def place_of(facts: HostFacts) -> str:
    """Where this process runs, as ``registry.PLACES`` names it."""
    if not facts.is_linux:
        return "other"
    return "container" if facts.in_container else "host"


def preferred_backends(facts: HostFacts) -> tuple[tuple[str, ...], str]:
    """The order ``auto`` tries backends in, and why (each row's ``rank`` in the registry)."""
    place = place_of(facts)
    why = registry.PLACES[place]
    if place == "other":
        why += f"; this is {facts.platform}"
    return registry.auto_order(place), why


@dataclass(frozen=True)
class EnvironmentInfo:
    """Everything ``auto`` bases its choice on, with the reasons. See ``explain``."""

    facts: HostFacts
    preference: tuple[str, ...]
    preference_reason: str
    backends: dict[str, BackendStatus]
    auto_backend: str
    auto_reason: str
    mode: str
    require_isolation: bool

    # Flat accessors for the questions people ask most.
    @property
    def platform(self) -> str:
        return self.facts.platform

    @property
    def in_container(self) -> bool:
        return self.facts.in_container

    @property
    def in_kubernetes(self) -> bool:
        return self.facts.in_kubernetes

    @property
    def pod_runs_gvisor(self) -> bool:
        return self.facts.pod_runs_gvisor

    @property
    def isolated(self) -> bool:
        return self.backends[self.auto_backend].isolated if self.auto_backend else False

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["isolated"] = self.isolated
        return data

    def explain(self) -> str:
        facts = self.facts
        lines = [
            f"platform: {facts.platform} ({facts.machine}), "
            f"{'root' if facts.is_root else 'ordinary user'}",
            f"in container: {'yes' if facts.in_container else 'no'}"
            + (f" ({'; '.join(facts.evidence)})" if facts.evidence else ""),
            f"in Kubernetes: {'yes' if facts.in_kubernetes else 'no'}",
            f"this process already runs under gVisor: {'yes' if facts.pod_runs_gvisor else 'no'}",
            f"mode: {self.mode}; require isolation: {'yes' if self.require_isolation else 'no'}",
            f"auto order: {' > '.join(self.preference)} ({self.preference_reason})",
            "",
        ]
        for name, status in self.backends.items():
            mark = "ok " if status.available else "no "
            version = f" [{status.version}]" if status.version else ""
            lines.append(f"  {mark} {name}{version}: {status.reason}")
            if status.fix and not status.available:
                lines.append(f"       fix: {status.fix}")
        lines.append("")
        if self.auto_backend:
            state = "ISOLATED (gVisor)" if self.isolated else "NOT ISOLATED"
            if not self.isolated and facts.pod_runs_gvisor:
                state += " from the kernel (inside the pod's own gVisor sandbox)"
            lines.append(f"commands will run with: {self.auto_backend} -> {state}")
        if facts.pod_runs_gvisor and not self.isolated:
            lines.append(f"note: {POD_GVISOR_NOTE}")
        lines.append(f"why: {self.auto_reason}")
        return "\n".join(lines)
