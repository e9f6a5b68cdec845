"""Every relative link and #anchor in README.md and docs/*.md resolves, as GitHub renders them."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the text may hold inline code with brackets stripped.
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation other than
    `-` and `_` removed, each space a `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        if ch in "-_ " or unicodedata.category(ch)[0] in "LN":
            kept.append("-" if ch == " " else ch)
    return "".join(kept)


def _lines_outside_code(text: str) -> list[tuple[int, str]]:
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated one gets -1, -2... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _number, line in _lines_outside_code(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file or #anchor does not exist, as `line: target`."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for number, line in _lines_outside_code(text):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            target = match.group(1)
            if _SCHEME.match(target) or target.startswith("//"):
                continue  # absolute: not ours to check offline
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            if not linked.exists():
                problems.append(f"{number}: {target} (no such file)")
                continue
            if (
                anchor
                and linked.suffix == ".md"
                and anchor not in anchors(linked.read_text(encoding="utf-8"))
            ):
                problems.append(f"{number}: {target} (no such anchor)")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_docs_pages_exist_and_the_readme_links_each() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    topics = ["api", "configuration", "digests", "reliability", "performance"]
    topics += ["deploying", "operating", "developing"]
    for topic in topics:
        assert (ROOT / "docs" / f"{topic}.md").is_file()
        assert f"(docs/{topic}.md" in readme
    assert len(readme.splitlines()) <= 300


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The two commands", "the-two-commands"),
        ("Python: `send_email` and `send_many`", "python-send_email-and-send_many"),
        ("Prerequisites (fresh Debian or Ubuntu)", "prerequisites-fresh-debian-or-ubuntu"),
        ("Against the targets of issue 5", "against-the-targets-of-issue-5"),
        ("Größe & Maß", "größe--maß"),
        ("See [the API](api.md)", "see-the-api"),
    ],
)
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n"
        "[fine](other.md#a-section) [second](other.md#a-section-1) [local](#here)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [bad local](#there)\n"
        "[web](https://example.com/x#y) `[code](nowhere.md)`\n\n"
        "```\n[fenced](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "6: missing.md (no such file)",
        "6: other.md#nowhere (no such anchor)",
        "6: #there (no such anchor)",
    ]
