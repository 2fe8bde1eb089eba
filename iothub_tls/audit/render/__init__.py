"""The audit as people and programs read it: a terminal table (:mod:`.text`), JSON and
CSV (:mod:`.data`), and one self-contained HTML page with SVG charts (:mod:`.html`)."""

from __future__ import annotations

from .data import to_csv, to_json
from .html import to_html
from .text import to_text

__all__ = ["to_csv", "to_html", "to_json", "to_text"]
