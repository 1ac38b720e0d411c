"""Links in the documentation: README.md and docs/**/*.md (and the notebook's markdown cells).

Every relative link or image must name a file inside the repository that exists, and an anchor
into a Markdown file (``page.md#section``, ``#section``) must name one of its headings. Links
may not leave the repository (``../shared/...``, absolute paths, ``file:`` URLs). Web links
(``https://...``) and ``mailto:`` are not followed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent

# [text](target "title") and ![alt](target); the target may be wrapped in <...>
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
# [id]: target
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
# <a href="..."> and <img src="...">
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
HTML_ID = re.compile(r"\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']")
ATTR_ID = re.compile(r"\{\s*#([\w-]+)[^}]*\}\s*$")  # attr_list: ## Heading {#id}
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page and notebook under docs/."""
    files = [root / "README.md"] if (root / "README.md").exists() else []
    docs = root / "docs"
    if docs.is_dir():
        files += sorted(docs.rglob("*.md")) + sorted(docs.rglob("*.ipynb"))
    return files


def markdown_of(path: Path) -> str:
    """The Markdown text of a page, or the markdown cells of a notebook."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "markdown"]
        return "\n\n".join("".join(c.get("source", "")) for c in cells)
    return path.read_text(encoding="utf-8")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text with fenced code blocks and inline code spans blanked out
    (so line numbers stay right)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            out.append("")
            continue
        if fence is not None:
            out.append("")
            continue
        out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", lambda m: " " * len(m.group(0)), line))
    return out


def links_in(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in the prose of a Markdown text."""
    found = []
    for n, line in enumerate(prose_lines(text), 1):
        for rx in (INLINE_LINK, REFERENCE_DEF, HTML_LINK):
            for m in rx.finditer(line):
                target = m.group(1).strip()
                if target.startswith("<") and target.endswith(">"):
                    target = target[1:-1]
                found.append((n, target))
    return found


def _plain_heading(text: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](link) -> text
    return text.replace("`", "").replace("**", "").strip()


def github_slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", _plain_heading(text).lower()).replace(" ", "-")


def toc_slug(text: str) -> str:
    """Python-Markdown's (mkdocs) default heading anchor."""
    value = unicodedata.normalize("NFKD", _plain_heading(text)).encode("ascii", "ignore")
    value = re.sub(r"[^\w\s-]", "", value.decode("ascii")).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors_of(path: Path) -> set[str]:
    """Every anchor a link into ``path`` may use: heading slugs (GitHub and mkdocs styles, with
    GitHub's -1, -2 suffixes for repeated headings), attr_list ids and HTML ids."""
    text = markdown_of(path)
    anchors: set[str] = set()
    seen: dict[tuple[str, str], int] = {}
    for line in prose_lines(text):
        m = HEADING.match(line)
        if m:
            heading = m.group(2)
            attr = ATTR_ID.search(heading)
            if attr:
                anchors.add(attr.group(1))
                heading = heading[: attr.start()]
            for style, slug, sep in (("github", github_slug(heading), "-"),
                                     ("mkdocs", toc_slug(heading), "_")):
                k = seen.get((style, slug), 0)
                anchors.add(slug if k == 0 else f"{slug}{sep}{k}")
                seen[style, slug] = k + 1
        anchors.update(HTML_ID.findall(line))
    return anchors


def check_file(path: Path, root: Path = ROOT) -> list[str]:
    """Problems with the links of one documentation file, as readable lines (empty = fine)."""
    root = root.resolve()
    problems = []
    rel = path.resolve().relative_to(root)
    for line, target in links_in(markdown_of(path)):
        where = f"{rel}:{line}: link {target!r}"
        parts = urlsplit(target)
        if parts.scheme in ("http", "https", "mailto"):
            continue
        if parts.scheme or parts.netloc:
            problems.append(f"{where} is not a relative link into the repository")
            continue
        if parts.path.startswith("/"):
            problems.append(f"{where} is an absolute path; use a path relative to {rel}")
            continue
        dest = (path.parent / unquote(parts.path)).resolve() if parts.path else path.resolve()
        if not dest.is_relative_to(root):
            problems.append(f"{where} points outside the repository ({dest})")
            continue
        if not dest.exists():
            problems.append(f"{where}: {dest.relative_to(root)} does not exist")
            continue
        if parts.fragment and dest.suffix in (".md", ".ipynb") and dest.is_file():
            if unquote(parts.fragment) not in anchors_of(dest):
                problems.append(f"{where}: no heading #{parts.fragment} in "
                                f"{dest.relative_to(root)}")
    return problems


# --- the repository's own documentation ---------------------------------------------------------
@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repo(path):
    assert check_file(path) == []


def test_docs_exist():
    names = {p.relative_to(ROOT).as_posix() for p in doc_files()}
    for page in ("README.md", "docs/index.md", "docs/theory.md", "docs/quickstart.ipynb"):
        assert page in names
    assert any(n.startswith("docs/guide/") for n in names)
    assert any(n.startswith("docs/api/") for n in names)


def test_docs_do_not_mention_the_private_notes():
    """The documentation stands alone: no path into the working notes outside the repo."""
    for path in doc_files():
        text = markdown_of(path)
        assert "shared/docs" not in text, path


# --- the checker itself can fail ----------------------------------------------------------------
def test_checker_catches_bad_links(tmp_path):
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    (tmp_path / "src.py").write_text("x = 1\n")
    (tmp_path / "docs" / "theory.md").write_text(
        "# Theory\n\n## §5 The limit\n\n## Notes {#notes}\n\n## Repeated\n\n## Repeated\n")
    page = tmp_path / "docs" / "guide" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](../theory.md) [ok anchor](../theory.md#5-the-limit) [ok id](../theory.md#notes)\n"
        "[ok repeated](../theory.md#repeated-1) ![ok image](../../src.py) [self](#page)\n"
        "[web](https://example.org/x.md) [mail](mailto:a@b.c)\n"
        "[missing](missing.md)\n"
        "[bad anchor](../theory.md#6-model-f)\n"
        "[outside](../../../shared/docs/theory.md)\n"
        "[absolute](/etc/passwd)\n"
        "[file url](file:///tmp/x.md)\n"
        "[ref]: ../nothere.md\n"
        '<img src="../gone.png">\n'
        "```\n[in code](not/checked.md)\n```\n"
        "and `[inline code](not/checked.md)` too\n")
    problems = check_file(page, root=tmp_path)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    for needle in ("'missing.md'", "#6-model-f", "outside the repository", "absolute path",
                   "'file:///tmp/x.md'", "'../nothere.md'", "'../gone.png'"):
        assert needle in text, needle
    assert "not/checked.md" not in text

    page.write_text("# Page\n\n[ok](../theory.md#5-the-limit)\n")
    assert check_file(page, root=tmp_path) == []


def test_slugs_match_github_and_mkdocs():
    assert github_slug("Model F (output feedback, theory §6) — quick mode") == \
        "model-f-output-feedback-theory-6--quick-mode"
    assert toc_slug("Model F (output feedback, theory §6) — quick mode") == \
        "model-f-output-feedback-theory-6-quick-mode"
    assert github_slug("§4 The empirical NTK, normalised") == toc_slug(
        "§4 The empirical NTK, normalised") == "4-the-empirical-ntk-normalised"
