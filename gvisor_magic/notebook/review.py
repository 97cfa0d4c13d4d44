"""The review of held writes in a notebook: what a cell wrote that waits for the user.

A command run with ``writes='auto'`` or ``'review'`` may leave changes held back
(``CommandResult.held``): they are not on the host. A ``HeldChanges``
(``gvisor_magic.writes``) keeps them for the kernel's life, so ``%isolation apply
PATH...`` and ``%isolation discard [PATH...]`` can act on them. ``review_widget`` shows
one command's held changes under its cell: a tree of paths marked ``+`` added, ``~``
modified and ``-`` deleted, each with why it was held, its diff for a small text file,
and buttons to apply or discard it, or all. Its ``text/plain`` form (terminals,
nbconvert, nbval) lists the same files and the lines to type instead of the buttons.
"""

from __future__ import annotations

import html
import posixpath

from ..changes import Change
from ..writes import HeldChanges, Writes

MARKS = {"added": "+", "modified": "~", "deleted": "-"}


def describe_change(c: Change) -> str:
    mark = MARKS.get(c.kind, "?")
    extra = f" -> {c.symlink}" if c.symlink else ("/" if c.is_dir else "")
    return f"{mark} {c.path}{extra}  ({c.held_reason})"


def plain(writes: Writes) -> str:
    """The text form: the held files and the lines that act on them."""
    held = writes.held()
    lines = [f"[gvisor-magic] {len(held)} change(s) held for review (not on the host; "
             f"writes={writes.mode!r}):"]
    lines += [f"  {describe_change(c)}" for c in held]
    lines.append("  apply: %isolation apply PATH...  (or %isolation apply --all)")
    lines.append("  discard: %isolation discard [PATH...]")
    return "\n".join(lines)


def to_html(writes: Writes) -> str:
    """The tree, marks, reasons and diffs, as HTML (also the widget's body)."""
    rows = []
    for c in writes.held():
        depth = c.path.count("/")
        name = posixpath.basename(c.path) + ("/" if c.is_dir else "")
        colour = {"added": "#1a7f37", "modified": "#9a6700", "deleted": "#cf222e"}.get(c.kind)
        diff = (f"<details><summary>diff</summary><pre style='margin:0'>"
                f"{html.escape(c.diff)}</pre></details>" if c.diff else "")
        rows.append(
            f"<div style='margin-left:{depth * 1.2:.1f}em' title='{html.escape(c.path)}'>"
            f"<code style='color:{colour}'>{MARKS.get(c.kind, '?')}</code> "
            f"<code>{html.escape(name)}</code> "
            f"<span style='color:#57606a'>{html.escape(c.held_reason or '')}</span>{diff}</div>")
    return ("<div class='gvisor-magic-review'><b>Held for review</b> (not on the host; "
            f"writes={html.escape(writes.mode)})" + "".join(rows) + "</div>")


_WIDGET_CLASS = None


def _widget_class():
    """Defined on first use, so that importing this module does not import ipywidgets."""
    global _WIDGET_CLASS
    if _WIDGET_CLASS is None:
        import ipywidgets

        class ReviewWidget(ipywidgets.VBox):
            """One command's held changes with buttons; ``repr()`` is the text form."""

            def setup(self, writes: Writes, held: HeldChanges) -> None:
                self._writes, self._held = writes, held
                self.add_class("gvisor-magic-review")
                self._status = ipywidgets.HTML()
                self.redraw()

            def redraw(self, note: str = "") -> None:
                writes = self._writes
                rows = []
                for c in writes.held():
                    apply = ipywidgets.Button(description="Apply", button_style="success",
                                              layout=_button_layout(), tooltip=f"apply {c.path}")
                    drop = ipywidgets.Button(description="Discard", layout=_button_layout(),
                                             tooltip=f"discard {c.path}")
                    apply.on_click(lambda _b, p=c.path: self.act("apply", [p]))
                    drop.on_click(lambda _b, p=c.path: self.act("discard", [p]))
                    text = ipywidgets.HTML(_row_html(c))
                    rows.append(ipywidgets.HBox([apply, drop, text]))
                if rows:
                    every = ipywidgets.Button(description="Apply all", button_style="warning")
                    none = ipywidgets.Button(description="Discard all")
                    every.on_click(lambda _b: self.act("apply", None))
                    none.on_click(lambda _b: self.act("discard", None))
                    head = ipywidgets.HTML(
                        f"<b>{len(rows)} change(s) held for review</b> (not on the host; "
                        f"writes={html.escape(writes.mode)})")
                    self.children = [head, *rows, ipywidgets.HBox([every, none]), self._status]
                else:
                    self.children = [ipywidgets.HTML("<b>Nothing held any more.</b>"),
                                     self._status]
                self._status.value = html.escape(note)

            def act(self, verb: str, paths: list[str] | None) -> None:
                if paths is None:
                    paths = [c.path for c in self._writes.held()]
                if verb == "apply":
                    report = self._writes.apply(paths)
                    note = "; ".join([f"applied {p}" for p in report.applied]
                                     + [f"NOT applied {p}: {e.reason}"
                                        for p, e in report.conflicts.items()])
                else:
                    report = self._writes.discard(paths)
                    note = "; ".join(f"discarded {p}" for p in report.discarded)
                self._held.pending()
                self.redraw(note)

            def _repr_mimebundle_(self, **kwargs):
                data = super()._repr_mimebundle_(**kwargs)
                if data:  # ipywidgets cuts text/plain at 110 characters: keep it whole
                    data["text/plain"] = repr(self)
                return data

            def __repr__(self) -> str:
                return plain(self._writes) if self._writes.held() else \
                    "[gvisor-magic] nothing held any more"

        _WIDGET_CLASS = ReviewWidget
    return _WIDGET_CLASS


def _button_layout():
    import ipywidgets

    return ipywidgets.Layout(width="auto", min_width="5.5em", flex="0 0 auto")


def _row_html(c: Change) -> str:
    """One path of the tree: indented by its depth, marked, with why and its diff."""
    colour = {"added": "#1a7f37", "modified": "#9a6700", "deleted": "#cf222e"}.get(c.kind)
    depth = c.path.count("/")
    diff = (f"<details><summary>diff</summary><pre style='margin:0;font-size:90%'>"
            f"{html.escape(c.diff)}</pre></details>" if c.diff else "")
    return (f"<div style='padding-left:{depth * 1.5:.1f}em'>"
            f"<code style='color:{colour}'>{MARKS.get(c.kind, '?')}</code> "
            f"<code>{html.escape(c.path)}{'/' if c.is_dir else ''}</code> "
            f"<span style='color:#57606a'>{html.escape(c.held_reason or '')}</span>{diff}"
            "</div>")


def review_widget(writes: Writes, held: HeldChanges):
    """The review widget of one command's held changes."""
    widget = _widget_class()()
    widget.setup(writes, held)
    return widget
