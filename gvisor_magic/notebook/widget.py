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

from ..result import CommandResult

GREEN, AMBER, RED = "#1a7f37", "#b26b00", "#cf222e"


@dataclass
class LastRun:
    backend: str
    isolated: bool
    returncode: int | None
    duration: float
    outcome: str  # "exit 0", "timed out", "interrupted", "blocked"


@dataclass
class IsolationState:
    """What the widget shows; ``summary()`` is its stable text form."""

    backend: str = "unknown"
    isolated: bool = False
    fallback_reason: str | None = None
    runsc_version: str | None = None
    network: bool = False
    require_isolation: bool = False
    blocked: str | None = None
    session: str | None = None
    last: LastRun | None = None
    #: The kernel's own pod runs under gVisor (a gVisor RuntimeClass), so commands
    #: that are not isolated on their own still never reach the node's kernel.
    pod_gvisor: bool = False
    #: ``Limits.describe()`` of the limits the last command ran with.
    limits: str | None = None
    #: Protected-path entries the user relaxed, and what the last command left in quarantine.
    relaxed: str | None = None
    quarantined: str | None = None

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

    def summary(self) -> str:
        """One line, no timings, under 110 characters (ipywidgets cuts longer text)."""
        parts = [f"gvisor-magic: {self.headline}",
                 f"network {'ON' if self.network else 'off'}"]
        if self.last is not None:
            parts.append(f"last: {self.last.outcome}")
        text = " | ".join(parts)
        return text if len(text) <= 110 else text[:109] + "…"

    def record(self, result: CommandResult, outcome: str | None = None) -> None:
        self.backend, self.isolated = result.backend, result.isolated
        self.fallback_reason, self.network, self.blocked = result.fallback_reason, \
            result.network, None
        self.pod_gvisor = result.details.get("pod_sandbox") == "gVisor"
        self.relaxed = result.details.get("relaxed_protection")
        self.quarantined = result.details.get("quarantined")
        if outcome is None:
            outcome = "timed out" if result.timed_out else (
                f"killed by {result.signal_name}" if result.returncode < 0
                else f"exit {result.returncode}")
        self.last = LastRun(result.backend, result.isolated, result.returncode, result.duration,
                            outcome)

    def record_blocked(self, reason: str) -> None:
        self.blocked = reason
        self.isolated = False
        self.last = LastRun("none", False, None, 0.0, "blocked")

    def to_html(self) -> str:
        esc = html.escape
        rows = [("backend", self.backend),
                ("isolation", "gVisor" if self.isolated else (
                    "the pod's gVisor sandbox, shared with the kernel" if self.pod_gvisor
                    else "none (runs on the host)")),
                ("network", "ON" if self.network else "off")]
        if self.runsc_version:
            rows.append(("runsc", self.runsc_version))
        if self.session:
            rows.append(("session", self.session))
        if self.limits:
            rows.append(("limits", self.limits))
        if self.isolated:
            rows.append(("protected paths", "RELAXED for " + self.relaxed if self.relaxed
                         else "git, shell, IPython/Jupyter and Python start-up files read-only;"
                         " credentials hidden"))
        if self.quarantined:
            rows.append(("quarantined", self.quarantined))
        if self.blocked:
            rows.append(("blocked", self.blocked))
        elif self.fallback_reason:
            rows.append(("fallback", self.fallback_reason))
        if self.last is not None:
            rows.append(("last command", f"{self.last.backend}: {self.last.outcome} in "
                                         f"{self.last.duration:.2f}s"))
        body = "".join(f"<tr><td style='padding-right:1em;color:#57606a'>{esc(k)}</td>"
                       f"<td>{esc(v)}</td></tr>" for k, v in rows)
        icon = "&#x1F6E1;" if self.isolated and not self.blocked else "&#x26A0;"
        return (f"<div class='gvisor-magic-status' style='border-left:6px solid {self.colour};"
                f"padding:4px 10px;font-family:sans-serif;font-size:13px'>"
                f"<b style='color:{self.colour}'>{icon} {esc(self.headline)}</b>"
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
