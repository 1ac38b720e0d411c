"""mkdocs hook: index notation in docstrings is text, not a cross-reference.

Docstrings write matrix entries as plain text, e.g. ``transition[i][j]``. Markdown reads
``[i][j]`` as a reference-style link, and mkdocs-autorefs then warns that it cannot find the
target ``j`` (which fails ``mkdocs build --strict``). This hook turns such references back into
the literal text before autorefs resolves them. It only touches user-style references whose
identifier is one or two letters/digits, which no object of the package is named.
"""

from __future__ import annotations

import re

_AUTOREF = re.compile(r"<autoref (?P<attrs>[^>]*)>(?P<title>.*?)</autoref>", re.DOTALL)
_IDENTIFIER = re.compile(r'identifier="(?P<id>[^"]*)"')
_INDEX = re.compile(r"[A-Za-z0-9]{1,2}")


def _literal(match: re.Match) -> str:
    attrs = match["attrs"]
    ident = _IDENTIFIER.search(attrs)
    if ident is None or "optional" in attrs or not _INDEX.fullmatch(ident["id"]):
        return match[0]
    return f"[{match['title']}][{ident['id']}]"


def on_page_content(html: str, **kwargs) -> str:
    return _AUTOREF.sub(_literal, html)
