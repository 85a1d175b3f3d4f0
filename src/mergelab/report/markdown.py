"""Inline Markdown to HTML for report text (markdown-it-py, which rich already depends on)."""

from __future__ import annotations

from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark", {"html": False, "linkify": False})


def md_inline(text: str) -> str:
    """Inline Markdown (``code``, **bold**, *italic*, links) to HTML; raw HTML in the text is escaped."""
    return _MD.renderInline(text)
