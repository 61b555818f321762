"""A small document model that the HTML and Markdown renderers share, so both files carry the same content.

Text is plain (each renderer escapes it); tables hold already formatted strings; figures name a PNG (embedded in
the HTML as a data URI, linked from the Markdown) and its SVG twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Paragraph:
    text: str
    kind: str = "text"          # "text", "note" (a caveat) or "summary"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    kind: str = "text"


@dataclass(frozen=True)
class Table:
    """A table of strings; ``table_id`` is the HTML id (tests read tables back by it)."""

    frame: pd.DataFrame
    table_id: str
    caption: str = ""
    text_columns: tuple[str, ...] = ()    # left-aligned besides the first column


@dataclass(frozen=True)
class Image:
    png: Path
    caption: str
    svg: Path | None = None
    font_px: float | None = None          # the figure's smallest text, in pixels of the PNG (the page checks it)


@dataclass(frozen=True)
class Row:
    """Figures side by side (a curve and its paired differences): one row on a wide page; on a phone-wide one they
    stack, each at the column's width, so that their text stays readable."""

    images: tuple[Image, ...]


@dataclass(frozen=True)
class Section:
    title: str
    anchor: str
    parts: tuple[Paragraph | Bullets | Table | Image | Row, ...]
    subsections: tuple["Section", ...] = ()
    folded: bool = False                  # shown closed (HTML <details>): secondary content under the headline


@dataclass(frozen=True)
class Document:
    title: str
    intro: tuple[Paragraph | Bullets, ...]
    sections: tuple[Section, ...] = field(default_factory=tuple)


def anchor(text: str) -> str:
    """An HTML id / Markdown anchor from free text."""
    cleaned = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    return "-".join(part for part in cleaned.split("-") if part) or "section"
