"""The documentation's relative links lead somewhere: every ``[text](path#anchor)`` in README.md, docs/*.md
and the READMEs under feast_repo/ and bench/results/ names a file of the checkout and, with an anchor, a
heading of that file (GitHub's heading ids); and the README links every page of docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "feast_repo" / "README.md",
               ROOT / "feast_repo" / "production" / "README.md", ROOT / "bench" / "results" / "README.md"])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are code, not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_ids(text: str) -> set[str]:
    """GitHub's ids for the headings of a markdown file: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... for repeats."""
    ids: set[str] = set()
    for line in re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines():
        if m := re.match(r"#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n, unique = 0, slug
            while unique in ids:
                n += 1
                unique = f"{slug}-{n}"
            ids.add(unique)
    return ids


def relative_links(doc: Path) -> list[str]:
    return [t for t in LINK.findall(prose(doc.read_text())) if not re.match(r"[a-z]+:", t)]


def test_heading_ids_follow_github():
    text = ("# Quality: the +LLM ranker\n## How `llmfeat finetune` packs\n## Notes\n## Notes\n"
            "```\n# not a heading\n```\n")
    assert heading_ids(text) == {"quality-the-llm-ranker", "how-llmfeat-finetune-packs", "notes", "notes-1"}
    assert relative_links(ROOT / "README.md"), "README.md has no relative links: the parser is broken"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links none of docs/{missing}: add them to 'Where everything lives'"
