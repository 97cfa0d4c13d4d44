"""The isolation-status widget: where commands run, and how the last one went.

``IsolationState`` is plain data kept by the IPython extension and updated after
every run; ``StatusWidget`` renders it (an ``ipywidgets.HTML``, updated in place,
never an ``Output`` widget that prints). Its plain-text form, which terminals,
nbconvert and nbval see, is a stable one-line summary without timings.
"""

from __future__ import annotations

import html
import threading
import weakref
from dataclasses import dataclass

from ..memory import WATCHDOG_BOUND
from ..result import CommandResult
from .status import AMBER, GREEN, GREY, RED, icon


@dataclass
class LastRun:
    backend: str
    isolated: bool
    returncode: int | None
    duration: float
    outcome: str  # "exit 0", "timed out", "interrupted", "blocked"
    network: bool = False
    #: Its network in words (``CommandResult.network_policy``).
    network_policy: str = "off"
    #: Destinations it tried and was refused, one line each.
    blocked_destinations: tuple[str, ...] = ()
    #: Why it did not run under gVisor, when it did not.
    fallback_reason: str | None = None
    #: The cell chose its own backend (``--mode``) or requirement, so this run says
    #: nothing about what the kernel's commands use by default.
    own_choice: bool = False


@dataclass
class IsolationState:
    """What the widget shows; ``summary()`` is its stable text form.

    The headline is what the kernel's commands use by default (from detection, then
    from each run that took the default path); ``last`` is the last command, which a
    cell may have sent elsewhere (``--mode subprocess``) without changing the default.
    """

    backend: str = "unknown"
    isolated: bool = False
    fallback_reason: str | None = None
    #: What the default backend's probe said of its version ("runsc version ...").
    version: str | None = None
    #: The default network in words ("off", "allowlist: pypi", ...).
    network: str = "off"
    require_isolation: bool = False
    blocked: str | None = None
    session: str | None = None
    last: LastRun | None = None
    #: The kernel's own pod runs under gVisor (a gVisor RuntimeClass), so commands
    #: that are not isolated on their own still never reach the node's kernel.
    pod_gvisor: bool = False
    #: ``Limits.describe()`` of the default limits, with what enforces them on the
    #: default backend.
    limits: str | None = None
    #: Protected-path entries the user relaxed, and what the last command left in quarantine.
    relaxed: str | None = None
    quarantined: str | None = None
    #: What happens to commands' writes to the working dir ("auto: 2 applied, 1 held...",
    #: "direct: subprocess runs on the host and cannot hold writes ...").
    writes: str | None = None

    @property
    def colour(self) -> str:
        if self.blocked:
            return RED
        return GREEN if self.isolated else AMBER

    @property
    def headline(self) -> str:
        if self.blocked:
            return "BLOCKED: isolation required but unavailable"
        if self.isolated:
            return f"isolated by gVisor ({self.backend})"
        if self.pod_gvisor:
            return f"NOT isolated from the kernel ({self.backend}; pod runs under gVisor)"
        return f"NOT isolated ({self.backend})"

    def _last_words(self) -> str:
        last = self.last
        assert last is not None
        if last.outcome == "blocked" or (last.isolated == self.isolated and \
                last.backend == self.backend):
            return last.outcome
        where = last.backend if last.isolated else f"{last.backend}, NOT isolated"
        return f"{where}: {last.outcome}"

    def summary(self) -> str:
        """One line, no timings, under 110 characters (ipywidgets cuts longer text)."""
        parts = [f"gvisor-magic: {self.headline}",
                 f"network {self.network}"]
        if self.last is not None:
            parts.append(f"last: {self._last_words()}")
        text = " | ".join(parts)
        return text if len(text) <= 110 else text[:109] + "…"

    def record(self, result: CommandResult, outcome: str | None = None,
               own_choice: bool = False) -> None:
        """A finished run; ``own_choice``: the cell picked its backend itself."""
        if not own_choice:
            self.backend, self.isolated = result.backend, result.isolated
            self.fallback_reason, self.blocked = result.fallback_reason, None
            self.pod_gvisor = result.details.get("pod_sandbox") == "gVisor"
        self.relaxed = result.details.get("relaxed_protection")
        self.quarantined = result.details.get("quarantined")
        if result.details.get("writes") and not own_choice:  # as the backend: the default's
            self.writes = result.details["writes"]
        if outcome is None:
            outcome = "timed out" if result.timed_out else (
                f"killed by {result.signal_name}" if result.returncode < 0
                else f"exit {result.returncode}")
        self.last = LastRun(result.backend, result.isolated, result.returncode, result.duration,
                            outcome, network=result.network,
                            network_policy=result.network_policy,
                            blocked_destinations=tuple(b.describe() for b in result.blocked),
                            fallback_reason=result.fallback_reason, own_choice=own_choice)

    def record_blocked(self, reason: str, own_choice: bool = False) -> None:
        if not own_choice:
            self.blocked = reason
            self.isolated = False
        self.last = LastRun("none", False, None, 0.0, "blocked", fallback_reason=reason,
                            own_choice=own_choice)

    def to_html(self) -> str:
        esc = html.escape
        rows = [("backend", self.backend, None),
                ("isolation", "gVisor" if self.isolated else (
                    "the pod's gVisor sandbox, shared with the kernel" if self.pod_gvisor
                    else "none (runs on the host)"), None),
                ("network", self.network, RED if self.network.startswith("HOST") else None)]
        if self.version:
            rows.append(("version", self.version, None))
        if self.session:
            rows.append(("session", self.session, None))
        if self.limits:
            rows.append(("default limits", self.limits, None))
            if "watchdog" in self.limits:  # say what it bounds, and what it cannot see
                rows.append(("memory watchdog", WATCHDOG_BOUND, None))
        if self.isolated:
            rows.append(("protected paths", "RELAXED for " + self.relaxed if self.relaxed
                         else "git, shell, IPython/Jupyter and Python start-up files read-only;"
                         " credentials hidden", None))
        if self.writes:
            rows.append(("writes", self.writes, AMBER if self.writes.startswith("direct:")
                         else None))
        if self.quarantined:
            rows.append(("quarantined", self.quarantined, AMBER))
        if self.blocked:
            rows.append(("blocked", self.blocked, RED))
        elif self.fallback_reason:
            rows.append(("fallback", self.fallback_reason, AMBER))
        last = self.last
        if last is not None:
            words = f"{last.backend}: {last.outcome} in {last.duration:.2f}s"
            alarm = None
            if last.outcome == "blocked":
                words, alarm = f"blocked: {last.fallback_reason}", RED
            elif not last.isolated:
                words += " — NOT isolated" + (" (this cell's own --mode)" if last.own_choice
                                              else "")
                alarm = AMBER
            if last.network_policy != self.network:
                words += f", network {last.network_policy} for this cell"
            rows.append(("last command", words, alarm))
            if last.blocked_destinations:
                rows.append(("network refused", "; ".join(last.blocked_destinations[:5]),
                             AMBER))
        body = "".join(
            f"<tr><td style='padding-right:1em;color:{GREY};vertical-align:top'>{esc(k)}</td>"
            + (f"<td style='color:{c};font-weight:600'>" if c else "<td>") +
            f"{icon(False, c, 12) + ' ' if c else ''}{esc(v)}</td></tr>"
            for k, v, c in rows)
        mark = icon(self.isolated and not self.blocked, self.colour, 16)
        return (f"<div class='gvisor-magic-status' style='border-left:6px solid {self.colour};"
                f"padding:4px 10px;font-family:sans-serif;font-size:13px'>"
                f"<div style='display:flex;align-items:center;gap:6px;font-weight:bold;"
                f"color:{self.colour}'>{mark}<span>{esc(self.headline)}</span></div>"
                f"<table style='margin-top:4px'>{body}</table></div>")


class _Views:
    """Live widgets showing one state, refreshed together after each run."""

    def __init__(self) -> None:
        self._widgets: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, widget) -> None:
        with self._lock:
            self._widgets.add(widget)

    def refresh(self, state: IsolationState) -> None:
        with self._lock:
            widgets = list(self._widgets)
        for widget in widgets:
            widget.show(state)


VIEWS = _Views()


_WIDGET_CLASS = None


def _widget_class():
    """Defined on first use, so that importing this module does not import ipywidgets."""
    global _WIDGET_CLASS
    if _WIDGET_CLASS is None:
        import ipywidgets

        class StatusWidget(ipywidgets.HTML):
            """The isolation status; ``repr()`` (its text/plain form) is the stable summary."""

            def show(self, new_state: IsolationState) -> None:
                self._summary = new_state.summary()
                self.value = new_state.to_html()

            def __repr__(self) -> str:
                return getattr(self, "_summary", "gvisor-magic: status unknown")

        _WIDGET_CLASS = StatusWidget
    return _WIDGET_CLASS


def make_widget(state: IsolationState):
    """A live ``StatusWidget`` (an ``ipywidgets.HTML``) showing ``state``."""
    widget = _widget_class()()
    widget.show(state)
    VIEWS.add(widget)
    return widget
