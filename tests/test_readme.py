"""Every Python example in the README and in docs/ runs as written; every relative link in them
points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]


def test_readme_has_examples():
    names = [page.name for page, _ in BLOCKS]
    assert names.count("README.md") >= 4 and "gradients.md" in names, names


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{page.name}-{n}" for n, (page, _) in enumerate(BLOCKS)])
def test_readme_example_runs(index):
    page, block = BLOCKS[index]
    exec(compile(block, f"{page.relative_to(ROOT)} example {index}", "exec"), {})


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    """Links between the README and docs/ (and into the repository) name files that exist; an
    anchor names a heading of its page, as GitHub spells anchors."""
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("../shared/") or path.startswith("../../shared/"):
            continue                                # the spec lives beside the repository
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in headings}
            assert anchor in slugs, f"{page.name}: {target} (headings: {sorted(slugs)})"
