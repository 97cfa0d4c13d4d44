"""What a cell shows after an isolated command: a quiet badge, or a loud line on stderr.

JupyterLab paints stderr red, so a status line there makes every successful cell look
like an error. A command that ran as asked gets a one-line ``display_data`` instead:
a small ``text/html`` badge, and a ``text/plain`` form without timings that terminals,
nbconvert and nbval see. What needs the user's attention stays loud, on stderr: not
isolated, a fallback, a timeout or a kill (a limit hit, an interrupt), a sandbox error,
truncated output, and every warning of ``CommandResult.warnings`` (a protected path
touched, protection relaxed, a session replaced).
"""

from __future__ import annotations

import html
import sys

from ..result import CommandResult

GREEN, AMBER, RED, GREY = "#1a7f37", "#b26b00", "#cf222e", "#57606a"
PREFIX = "[gvisor-magic]"

# Inline SVG, so the marks render the same without emoji fonts (a headless browser, a
# minimal desktop): a shield for "isolated", a triangle for "needs attention".
_SHIELD = ("<svg width='{size}' height='{size}' viewBox='0 0 16 16' aria-hidden='true' "
           "style='vertical-align:-2px;flex:none'><path fill='{colour}' d='M8 0.8 2 3.2v4.3c0 "
           "3.7 2.6 6.6 6 7.7 3.4-1.1 6-4 6-7.7V3.2z'/><path fill='none' stroke='#fff' "
           "stroke-width='1.6' d='m5 8 2 2 4-4'/></svg>")
_TRIANGLE = ("<svg width='{size}' height='{size}' viewBox='0 0 16 16' aria-hidden='true' "
             "style='vertical-align:-2px;flex:none'><path fill='{colour}' d='M8 1 0.5 14.5h15z'/>"
             "<path stroke='#fff' stroke-width='1.8' d='M8 6v4.2M8 11.6v1.4'/></svg>")


def icon(isolated: bool, colour: str, size: int = 14) -> str:
    """The shield (isolated) or warning triangle, as inline SVG in ``colour``."""
    return (_SHIELD if isolated else _TRIANGLE).format(size=size, colour=colour)


def needs_attention(result: CommandResult) -> bool:
    """True when the outcome must be said loudly (stderr), not as a quiet badge."""
    return (not result.isolated or bool(result.fallback_reason) or result.timed_out
            or result.returncode < 0 or bool(result.error) or result.truncated
            or bool(result.warnings(held=False)))


def plain(result: CommandResult, note: str = "") -> str:
    """The badge's stable text: where it ran and how it ended, without timings."""
    where = f"{result.backend} ({'gVisor' if result.isolated else 'NOT isolated'})"
    text = f"{PREFIX} {where}: exit {result.returncode}"
    if result.network:
        text += f", network: {result.network_policy}"
    return text + (f" ({note})" if note else "")


def badge_html(result: CommandResult, note: str = "") -> str:
    colour = GREEN if result.returncode == 0 else AMBER
    words = html.escape(result.describe() + (f" ({note})" if note else ""))
    return (f"<div class='gvisor-magic-badge' title='gvisor-magic' style='display:flex;"
            f"align-items:center;gap:5px;font:12px/1.4 sans-serif;color:{GREY}'>"
            f"{icon(True, colour, 13)}<span>{words}</span></div>")


def report(result: CommandResult, quiet: bool, note: str = "") -> None:
    """Show how ``result`` went, quietly if it went as asked; warnings even when ``quiet``."""
    if not quiet:
        if needs_attention(result):
            marker = "" if result.isolated else "WARNING: "
            line = result.describe() + (f" ({note})" if note else "")
            print(f"{PREFIX} {marker}{line}", file=sys.stderr, flush=True)
        else:
            from IPython.display import display

            sys.stdout.flush()  # the command's own output first
            display({"text/plain": plain(result, note), "text/html": badge_html(result, note)},
                    raw=True)
    for warning in result.warnings(held=False):  # held changes: the review widget
        print(f"{PREFIX} WARNING: {warning}", file=sys.stderr, flush=True)
