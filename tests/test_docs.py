"""The front door stays a front door: README.md under 10 KB, user docs without the lab notebook's diary labels or
commit hashes (those belong to CHANGELOG.md and the results pages under results/), and every relative link in the
README and docs/ resolves to a file of the checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
PAGES = [README, *DOCS]

README_MAX_BYTES = 10 * 1024
DIARY_LABEL = re.compile(r"\bsessions? \d+", re.IGNORECASE)
# 7 to 40 hex digits with at least one digit and one letter a-f: a commit hash, not a number or a word
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_readme_is_at_most_ten_kilobytes() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_diary_label_or_commit_hash_outside_changelog_and_results(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    labels = DIARY_LABEL.findall(text)
    hashes = COMMIT_HASH.findall(text)
    assert not labels, f"{_rel(page)}: diary labels {labels}: the story goes to CHANGELOG.md"
    assert not hashes, f"{_rel(page)}: commit hashes {hashes}: they go to CHANGELOG.md or results/<gpu>/README.md"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_points_at_a_file(page: Path) -> None:
    missing = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{_rel(page)}: links to missing files: {missing}"


def test_the_checks_catch_what_they_are_for() -> None:
    assert DIARY_LABEL.search("as measured in session 8")
    assert COMMIT_HASH.search("the run of 4a5475b") and COMMIT_HASH.search("abd7f47")
    assert not COMMIT_HASH.search("1,539 ms, 40860802176 bytes, a decade of facade")
