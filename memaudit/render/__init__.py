"""Rendering: reports as one self-contained HTML page, a Markdown summary, and sentences.

Pure functions of :mod:`memaudit.schema` reports; nothing in the schema imports this package.
"""

from memaudit.render.html import read_html, read_reports, render_fragment, render_html, write_html
from memaudit.render.markdown import render_markdown
from memaudit.render.sentences import gate_message, unlearn_sentences, verdict_sentences

__all__ = [
    "gate_message",
    "read_html",
    "read_reports",
    "render_fragment",
    "render_html",
    "render_markdown",
    "unlearn_sentences",
    "verdict_sentences",
    "write_html",
]
