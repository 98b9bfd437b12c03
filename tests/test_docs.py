"""The README and docs/ cannot go stale: every ```python block in them runs here, on CPU,
each on its own (a fresh namespace: a block carries its own imports and inputs), and every
relative link points at a file and heading that exist.

A block that must not run here is marked by an HTML comment on the line before its fence,
which GitHub does not render: `<!-- not-run: why -->` (e.g. needs a GPU, needs RecBole).
Blocks in any other language (bash, plain text) are not run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not-run: (?P<why>\S.*?) -->$")
README_MAX_LINES = 320  # the front door stays short: details go to docs/


def fenced_blocks(text: str):
    """(language, first code line, 1-based; code; the line before the fence) of each fenced
    block of a markdown text. A fence of more backticks can hold shorter ones: those are code."""
    lines = text.split("\n")
    blocks, fence = [], None  # fence: (backticks, language, index of the opening line)
    for index, line in enumerate(lines):
        if fence is None:
            opening = re.match(r"^(`{3,})([\w-]*)\s*$", line.strip())
            if opening:
                fence = (opening[1], opening[2], index)
        elif line.strip() == fence[0]:
            ticks, language, start = fence
            before = lines[start - 1].strip() if start else ""
            blocks.append((language, start + 2, "\n".join(lines[start + 1 : index]), before))
            fence = None
    if fence is not None:
        raise ValueError(f"line {fence[2] + 1}: a fenced block that is never closed")
    return blocks


def python_blocks(text: str):
    """(first code line; code; the reason it is not run, or None) of each ```python block."""
    return [
        (line, code, marker and marker["why"])
        for language, line, code, before in fenced_blocks(text)
        if language == "python"
        for marker in [NOT_RUN.match(before)]
    ]


def prose(text: str) -> str:
    """text without its fenced blocks (no links or headings are read from code)."""
    lines = text.split("\n")
    for _, line, code, _ in fenced_blocks(text):
        lines[line - 1 : line - 1 + len(code.split("\n"))] = [""] * len(code.split("\n"))
    return "\n".join(lines)


def _snippets():
    for page in PAGES:
        for line, code, not_run in python_blocks(page.read_text()):
            name = f"{page.relative_to(ROOT)}:{line}"
            marks = [pytest.mark.skip(reason=f"not run ({not_run})")] if not_run else []
            yield pytest.param(page, line, code, id=name, marks=marks)


@pytest.mark.parametrize("page, line, code", list(_snippets()))
def test_snippet_runs(page, line, code):
    # Compiled at its own line of its own file, so a traceback points into the page.
    compiled = compile("\n" * (line - 1) + code, str(page), "exec")
    exec(compiled, {"__name__": "__snippet__"})


def test_the_block_parser():
    text = "\n".join(
        [
            "# Title",
            "```python",
            "x = 1",
            "```",
            "<!-- not-run: needs a GPU -->",
            "```python",
            "y = torch.ones(1, device='cuda')",
            "```",
            "````markdown",
            "```python",
            "shown = 'not run'",
            "```",
            "````",
            "```bash",
            "make test",
            "```",
        ]
    )
    assert python_blocks(text) == [(3, "x = 1", None), (7, "y = torch.ones(1, device='cuda')", "needs a GPU")]
    assert "make test" not in prose(text) and "# Title" in prose(text)
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nx = 1\n")


def test_a_failing_snippet_fails(tmp_path):
    """What the runner does with a stale snippet: the error surfaces at the page's line."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nimport seqrec_kernels as sk\nsk.no_such_function()\n```\n")
    ((line, code, _),) = python_blocks(page.read_text())
    with pytest.raises(AttributeError) as error:
        test_snippet_runs(page, line, code)
    assert error.traceback[-1].path == page and error.traceback[-1].lineno + 1 == 5


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = prose(page.read_text())
    return {_slug(match) for match in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = prose(page.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert broken == []


def test_readme_is_the_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split("\n")) <= README_MAX_LINES, "README.md: move details into a docs/ page"
    unlinked = [page.name for page in PAGES[1:] if f"(docs/{page.name}" not in readme]
    assert unlinked == [], "README.md must link to every docs/ page"
