"""report.md: the HTML report's content as Markdown (GitHub flavour), figures linked as the PNG files beside it."""

from __future__ import annotations

from .document import Bullets, Document, Image, Paragraph, Row, Section, Table


def render_markdown(document: Document) -> str:
    lines = [f"# {_inline(document.title)}", ""]
    for part in document.intro:
        lines += _part(part)
    if document.sections:
        lines += [f"- [{_inline(s.title)}](#{s.anchor})" for s in document.sections] + [""]
    for section in document.sections:
        lines += _section(section, level=2)
    return "\n".join(lines).rstrip() + "\n"


def _section(section: Section, *, level: int) -> list[str]:
    if section.folded:  # GitHub renders <details> closed, the Markdown inside it as usual
        lines = [f'<details id="{section.anchor}"><summary>{_inline(section.title)}</summary>', ""]
    else:
        lines = [f'<a id="{section.anchor}"></a>', "", f"{'#' * level} {_inline(section.title)}", ""]
    for part in section.parts:
        lines += _part(part)
    for sub in section.subsections:
        lines += _section(sub, level=min(level + 1, 6))
    return lines + (["</details>", ""] if section.folded else [])


def _part(part: Paragraph | Bullets | Table | Image) -> list[str]:
    if isinstance(part, Paragraph):
        text = _inline(part.text)
        return [f"> {text}" if part.kind == "note" else text, ""]
    if isinstance(part, Bullets):
        return [f"- {_inline(item)}" for item in part.items] + [""]
    if isinstance(part, Table):
        return _table(part)
    if isinstance(part, Image):
        return [f"![{_inline(part.caption)}]({part.png.name})", "", f"*{_inline(part.caption)}*", ""]
    if isinstance(part, Row):  # inline images on one line: side by side where the page is wide enough
        return [" ".join(f"![{_inline(image.caption)}]({image.png.name})" for image in part.images), "",
                "*" + " | ".join(_inline(image.caption) for image in part.images) + "*", ""]
    raise TypeError(f"unknown document part {type(part).__name__}")


def _table(table: Table) -> list[str]:
    columns = [str(c) for c in table.frame.columns]
    left = {columns[0], *table.text_columns} if columns else set()
    lines = [f"*{_inline(table.caption)}*", ""] if table.caption else []
    lines.append("| " + " | ".join(_cell(c) for c in columns) + " |")
    lines.append("| " + " | ".join("---" if c in left else "---:" for c in columns) + " |")
    for record in table.frame.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_cell(str(v)) for v in record) + " |")
    return lines + [""]


def _cell(text: str) -> str:
    return _inline(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    """Escape the characters Markdown would read as emphasis or HTML."""
    for char in ("\\", "*", "_", "`", "<", ">"):
        text = text.replace(char, "\\" + char)
    return text
