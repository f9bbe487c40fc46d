"""The repository's documents: the README stays a user's document of bounded size, no tracked
file refers to work periods or tracker entries by number, and every place the README sends a
reader to under docs/ or bench/RESULTS.md exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_BYTES_MAX = 30_000

# Built from pieces so that this file does not match its own pattern.
_WORDS = "|".join(("sess" + "ion", "iss" + "ue"))
NUMBERED_REFERENCE = re.compile(r"(?i)\b(" + _WORDS + r")s? [0-9]")

MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
DOCUMENT_PATH = re.compile(r"(?<![\w./-])((?:docs/[\w./-]*[\w/])|bench/RESULTS\.md)")


def _tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git work tree (the check reads the tracked files)")
    return [ROOT / name for name in listed.decode().split("\0") if name]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary (or deleted, unreadable) file."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def test_readme_is_under_its_size_bound():
    """The README is a user's document: history and internals live elsewhere, so it stays
    under 30,000 bytes."""
    size = len(README.read_bytes())
    assert size < README_BYTES_MAX, f"README.md is {size} bytes, the bound is {README_BYTES_MAX}"


def test_the_pattern_catches_what_it_is_meant_to():
    """The check below would catch a numbered reference in any spelling, and not ordinary
    prose about sessions or issues."""
    session, issue = "Sess" + "ion", "ISS" + "UE"   # (pieces again: see NUMBERED_REFERENCE)
    for text in (f"{session} 14 figures", f"{issue} 3's target", f"{issue.lower()}s 4 and 5",
                 f"{session.lower()}s 7-12"):
        assert NUMBERED_REFERENCE.search(text), text
    for text in ("a session's start", "the issue quotes", "reissue 3", "obsession 2"):
        assert not NUMBERED_REFERENCE.search(text), text


def test_no_tracked_file_refers_to_numbered_sessions_or_issues():
    """No tracked text file names a work period or a tracker entry by number: what a change
    did is said in words (and dates, in bench/RESULTS.md)."""
    found = []
    for path in _tracked_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if NUMBERED_REFERENCE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "numbered references:\n" + "\n".join(found)


def _readme_targets() -> set[str]:
    text = README.read_text()
    targets = set()
    for link in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue   # a URL or an anchor in the README itself
        targets.add(link.split("#", 1)[0])
    targets.update(DOCUMENT_PATH.findall(text))
    return {t for t in targets if t}


def test_readme_links_and_document_paths_exist():
    """Every relative link in the README, and every path under docs/ or to bench/RESULTS.md
    it names, leads to a file or folder in the repository."""
    targets = _readme_targets()
    assert "bench/RESULTS.md" in targets and any(t.startswith("docs/") for t in targets)
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, f"README.md points to what does not exist: {missing}"


def test_docs_links_exist():
    """The documents under docs/ link only to files that exist (relative to each document)."""
    missing = []
    for document in sorted((ROOT / "docs").glob("*.md")):
        for link in MARKDOWN_LINK.findall(document.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
                continue
            if not (document.parent / link.split("#", 1)[0]).exists():
                missing.append(f"{document.relative_to(ROOT)} -> {link}")
    assert not missing, "broken links: " + ", ".join(missing)
