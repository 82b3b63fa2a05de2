"""The README and docs/ stand on their own: every file they link or name exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Folders that hold the repository's own files (runs/ and .venv/ are made by commands).
TRACKED = ("csrc/", "ipsd_cuda/", "python_tests/", "bench/", "scripts/", "docs/", ".ci/")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_references_resolve(doc):
    text = doc.read_text()
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
    paths = [t for t in re.findall(r"`([^`\s]+)`", text) if t.startswith(TRACKED)]
    missing = [t for t in links + paths if not (doc.parent / t).exists() and not (ROOT / t).exists()]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
