"""mkdocs hook: reST cross-reference roles left in a docstring render as Markdown references.

mkdocstrings renders docstrings as Markdown, where ``:class:`~pkg.mod.Name` `` would show raw
(``:class:`` followed by a code span). This hook turns each such role in the rendered page into
an optional cross-reference to the object (the last name only with ``~``, as Sphinx shows it),
which autorefs links when the object is documented and leaves as code otherwise.
"""

from __future__ import annotations

import html
import re

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|const):"
                  r"<code>(?P<tilde>~?)(?P<target>[\w.]+)(?P<call>\(\))?</code>")


def _reference(match: re.Match) -> str:
    target = match["target"]
    title = (target.rsplit(".", 1)[-1] if match["tilde"] else target) + (match["call"] or "")
    return (f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>")


def convert(page_html: str) -> str:
    return ROLE.sub(_reference, page_html)


def on_page_content(html: str, **kwargs) -> str:
    return convert(html)
