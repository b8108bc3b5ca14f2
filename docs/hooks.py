"""MkDocs hook: the docstrings' Sphinx roles (``:func:`x```, ``:class:`~a.B```) shown as plain code.

mkdocstrings renders a docstring as Markdown, where a role stays as text before its code span; this
drops the role (and the ``~`` that in Sphinx means "show the last name only", keeping the last name).
"""
import re

ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>(~?)([^<]*)</code>")


def show(m: re.Match) -> str:
    name = m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)
    return f"<code>{name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(show, html)
