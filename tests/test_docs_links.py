"""The README stays short and every relative link in the documentation resolves.

Checked: README.md, docs/**/*.md and benchmarks/**/*.md. Every inline link or
image (``[text](target)``, ``![alt](target)``) and reference definition
(``[id]: target``) outside code must name a file or folder that exists,
relative to the document; ``#anchor`` fragments pointing into a Markdown file
must name one of its headings (GitHub's slugs). URLs with a scheme (http,
https, mailto, ...) are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in ("docs", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def split_code(text: str) -> tuple[str, list[str]]:
    """(the text with fenced blocks blanked, the lines outside fences)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)[0] * len(m.group(2))
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out), out


def without_code(text: str) -> str:
    prose, _ = split_code(text)
    # code spans never cross a blank line
    return "\n\n".join(CODE_SPAN.sub("", para) for para in re.split(r"\n\s*\n", prose))


def slugify(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links: their text
    text = re.sub(r"<[^>]+>", "", text)                          # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, lines = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in lines:
        m = HEADING.match(line)
        if not m:
            continue
        slug = slugify(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = without_code(path.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REF_DEF.findall(text)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(path):
        if SCHEME.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{fragment}")
    return problems


def test_the_checker_sees_links_and_ignores_code(tmp_path):
    doc = tmp_path / "x.md"
    (tmp_path / "there.md").write_text("# A `b` title: (c)\n\n## A `b` title: (c)\n")
    doc.write_text(
        "[ok](there.md#a-b-title-c) ![img](there.md#a-b-title-c-1) [web](https://example.com)\n"
        "`[no](inline-code.md)` and [missing](gone.md) and [bad](there.md#nope)\n"
        "```\n[no](fenced.md)\n```\n[ref]: gone-too.md\n[self](#top)\n"
    )
    assert links(doc) == ["there.md#a-b-title-c", "there.md#a-b-title-c-1", "https://example.com",
                          "gone.md", "there.md#nope", "#top", "gone-too.md"]
    assert broken_links(doc, root=tmp_path) == ["x.md: (gone.md): no such file",
                   "x.md: (there.md#nope): no heading with anchor #nope",
                   "x.md: (#top): no heading with anchor #top",
                   "x.md: (gone-too.md): no such file"]


def test_every_relative_link_in_the_docs_resolves():
    files = doc_files()
    assert ROOT / "README.md" in files and any(f.parent.name == "docs" for f in files)
    problems = [p for f in files for p in broken_links(f)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short_and_keeps_the_ci_test_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"
    # CI runs .ci/run, which runs exactly the README's test command
    assert "make test" in text and "make test" in (ROOT / ".ci" / "run").read_text()
