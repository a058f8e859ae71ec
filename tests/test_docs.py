"""The docs stay in step with the code: every key documented with its default, a short README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from lorm_flwr.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _defaults() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    return str(value)


def test_every_key_is_documented_with_its_default():
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \| `([^`]*)` \|", text, re.MULTILINE))
    defaults = _defaults()
    assert set(rows) == set(RunConfig().to_dict()) == set(defaults)
    for key, value in defaults.items():
        assert rows[key] == _shown(value), (key, rows[key], value)


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 20_000, len(readme)
    for target in re.findall(r"\]\(((?:docs|configs|benchmarks)/[^)#]+)", readme):
        assert (ROOT / target).exists(), target
    for doc in (ROOT / "docs").glob("*.md"):
        text = doc.read_text()
        for target in re.findall(r"\]\((\.\./[^)#]+|[a-z_]+\.md)", text):
            assert (doc.parent / target).exists(), (doc.name, target)
        assert not re.search(r"commit `[0-9a-f]{7,}`", text), doc  # no history in the docs


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    headings = re.findall(r"^#{1,6} (.+?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_the_benchmarks_page_is_short_and_its_links_resolve():
    page = ROOT / "docs" / "benchmarks.md"
    history = ROOT / "benchmarks" / "results" / "history.md"
    assert len(page.read_text()) <= 10_000, len(page.read_text())
    for doc in (page, history):
        links = re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", doc.read_text())
        assert links, doc
        for target, anchor in links:
            if target.startswith(("http://", "https://")):
                continue
            path = (doc.parent / target) if target else doc
            assert path.exists(), (doc.name, target)
            if anchor:
                assert anchor in _anchors(path), (doc.name, target, anchor)
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for name, target in (("benchmarks.md", page), ("history.md", history)):
            for anchor in re.findall(rf"{re.escape(name)}#([^)\s]+)\)", text):
                assert anchor in _anchors(target), (doc.name, name, anchor)
