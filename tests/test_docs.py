"""The user documentation: links that resolve on GitHub and on PyPI, a short README, and words about
the software and its users only. Pure text checks, a few milliseconds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.env_independent  # the repository's files, Python only: `make test` only

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCHMARK_READMES = sorted((ROOT / "benchmarks").rglob("README.md"))
PYPI_DESCRIPTION = ROOT / tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["readme"]
EXAMPLES = sorted((ROOT / "examples").glob("*.y*ml"))
LINKED_PAGES = [README, *DOCS, *BENCHMARK_READMES]
USER_TEXTS = [*LINKED_PAGES, PYPI_DESCRIPTION, *EXAMPLES]

README_MAX_LINES = 300

# Words about how the project is built, never about the software or its users.
INTERNAL_WORDS = [
    r"\bsessions?\b",
    r"\blent\b",
    r"\bdevice tool\b",
    r"\bmirrors?\b",
    r"\bprevious submission\b",
    r"\bother agents?\b",
    r"\bissues? \d+",  # the project's own tracker, which users cannot see
]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a bracket is no link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def targets(text: str) -> list[str]:
    body = prose(text)
    return LINK.findall(body) + HTML_SRC.findall(body)


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def github_anchor(heading: str) -> str:
    """GitHub's id for a Markdown heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """Each relative link or image of `path` whose file, or whose heading in a Markdown file, is missing."""
    broken = []
    for target in targets(path.read_text(encoding="utf-8")):
        if not is_relative(target):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    return broken


@pytest.mark.parametrize("path", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(path):
    assert broken_links(path) == []


def test_a_planted_broken_link_is_found(tmp_path):
    """The check itself: a missing file and a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [bad anchor](other.md#no-such) ![img](nope.png)\n"
        "`[in code](missing-too.md)`\n```\n[in a block](missing-three.md)\n```\n[web](https://example.org/x)\n",
        encoding="utf-8",
    )
    assert [entry.split(":")[0] for entry in broken_links(page)] == ["missing.md", "other.md#no-such", "nope.png"]


def test_readme_stays_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in targets(README.read_text(encoding="utf-8"))
              if is_relative(t)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_pypi_description_has_no_relative_links_or_images():
    """PyPI renders the description away from the repository: a relative link or image breaks there."""
    relative = [t for t in targets(PYPI_DESCRIPTION.read_text(encoding="utf-8")) if is_relative(t)]
    assert relative == []


@pytest.mark.parametrize("path", USER_TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_speak_of_the_software_and_its_users(path):
    text = path.read_text(encoding="utf-8")
    found = [m.group(0) for word in INTERNAL_WORDS for m in re.finditer(word, text, re.IGNORECASE)]
    assert found == [], f"{path.relative_to(ROOT)}: {found}"
