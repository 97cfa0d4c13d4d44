"""Every relative link in the documentation leads somewhere, and the README stays short.

For README.md, SECURITY.md and every docs/*.md: a relative markdown link ``[x](path)``
must name an existing file or directory, and ``[x](path#anchor)`` or ``[x](#anchor)`` a
heading of the target, slugged as GitHub does (lowercase; punctuation other than ``-``
and ``_`` dropped; spaces to ``-``; a repeated heading gets ``-1``, ``-2``...).
Links in code (fenced blocks, inline spans) are not links and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"          # [text], one level of [] inside
                   r"\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)"  # (target
                   r"(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")             # "title")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ID = re.compile(r"""<a\s[^>]*(?:name|id)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0] * len(opened.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text)                          # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        found.update(_HTML_ID.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            found.append((number, match.group(1).strip("<>")))
    return found


def broken_links(path: Path) -> list[str]:
    """Every relative link of ``path`` whose file or anchor does not exist, described."""
    broken = []
    for number, target in links(path):
        if not target or _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{where}: {target}: no such file {dest}")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            broken.append(f"{where}: {target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert path.exists(), path
    assert broken_links(path) == []


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Known quirks (runsc 20240729, Debian)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## `run_command_isolated`: the API\n\n"
        "[ok](other.md) [ok](other.md#known-quirks-runsc-20240729-debian) [ok](#title)\n"
        "[ok](#run_command_isolated-the-api) [ok](https://example.invalid/x.md)\n"
        "`[code](missing.md)`\n```\n[code](missing.md)\n```\n"
        "[bad](missing.md) [bad](other.md#no-such-heading) [bad](#nowhere)\n")
    found = broken_links(page)
    assert len(found) == 3, found
    assert "missing.md" in found[0] and "#no-such-heading" in found[1] and "#nowhere" in found[2]


@pytest.mark.parametrize(("heading", "slug"), [
    ("The network", "the-network"),
    ('A whole kernel in gVisor: "Python 3 (gVisor)"', "a-whole-kernel-in-gvisor-python-3-gvisor"),
    ("Known gVisor quirks (runsc 20240729, Debian backports)",
     "known-gvisor-quirks-runsc-20240729-debian-backports"),
    ("`IsolatedSession` and `run_command_isolated`", "isolatedsession-and-run_command_isolated"),
    ("Hosted JupyterHub (Kubernetes)", "hosted-jupyterhub-kubernetes"),
])
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug
