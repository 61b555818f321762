"""report.html: one self-contained file (inline CSS, PNG figures as base64 data URIs, no network, no CDN).

Responsive: a max-width column, tables that scroll sideways on narrow screens, images scaled to the column.
A tiny inline script records, once the page has loaded, how many images decoded (``data-images-ok="N/M"`` on
``<body>``), how many errors were raised (``data-errors``) and whether the page is wider than the window
(``data-overflow``), the smallest plot text as rendered (``data-min-plot-font``, CSS px: each figure's smallest font
times the image's scale) and which tables are wider than their box (``data-clipped-tables``, ids), with every
folded ``<details>`` opened while measuring, so a headless browser can check the page.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .document import Bullets, Document, Image, Paragraph, Row, Section, Table

STYLE = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2430; background: #fafbfc; }
.wrap { max-width: 1100px; margin: 0 auto; padding: 1rem 1.2rem 3rem; }
h1 { font-size: 1.55rem; line-height: 1.25; margin: .6rem 0 1rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 .6rem; padding-bottom: .2rem; border-bottom: 1px solid #dde1e6; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
p, li { overflow-wrap: anywhere; }
nav ul { columns: 2 16rem; padding-left: 1.2rem; margin: .2rem 0; }
img { display: block; max-width: 100%; height: auto; margin: .4rem 0; background: #fff; }
figure { margin: 1rem 0; }
.row { display: flex; flex-wrap: wrap; gap: 0 1rem; align-items: flex-start; }
.row figure { flex: 1 1 330px; min-width: 0; }
figcaption { font-size: .85rem; color: #555e6b; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: .4rem 0 1.2rem; max-width: 100%; }
table { border-collapse: collapse; font-size: .86rem; font-variant-numeric: tabular-nums; background: #fff; }
caption { caption-side: top; text-align: left; font-size: .85rem; color: #555e6b; padding: .2rem 0; }
th, td { border-bottom: 1px solid #e3e6ea; padding: .25rem .65rem; text-align: right; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; white-space: normal; }
th.text, td.text { text-align: left; white-space: normal; min-width: 6rem; overflow-wrap: anywhere; }
details { margin: 1rem 0; }
summary { cursor: pointer; font-weight: 600; padding: .3rem 0; color: #2d4a7a; }
.summary { background: #fff; border-left: 4px solid #4c72b0; padding: .5rem 1rem; margin: .8rem 0; }
.note { background: #fff8e1; border-left: 4px solid #d9a400; padding: .35rem .9rem; margin: .6rem 0;
        font-size: .92rem; }
@media (max-width: 640px) {
  body { font-size: 14px; }
  .wrap { padding: .6rem .7rem 2rem; }
  th, td { padding: .2rem .3rem; white-space: normal; }
  th.text, td.text { min-width: 0; }
  h1 { font-size: 1.3rem; }
}
"""

CHECK_SCRIPT = """
(function () {
  var errors = 0, loaded = false;
  // In <head>, so that errors of every later script and resource (capture phase) are counted.
  window.addEventListener("error", function () { errors += 1; if (loaded) { mark(); } }, true);
  function mark() {
    var images = document.images, ok = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) { ok += 1; }
    }
    document.body.setAttribute("data-images-ok", ok + "/" + images.length);
    document.body.setAttribute("data-errors", String(errors));
    var page = document.documentElement;
    document.body.setAttribute("data-overflow", String(page.scrollWidth > page.clientWidth + 1));
    document.body.setAttribute("data-viewport", String(page.clientWidth));
    // Folded parts are opened while measuring, as a reader would open them, then closed again.
    var folds = document.querySelectorAll("details:not([open])"), f;
    for (f = 0; f < folds.length; f++) { folds[f].open = true; }
    // The smallest plot text as rendered: the figure's smallest font (PNG pixels) times the image's scale.
    var smallest = Infinity;
    for (i = 0; i < images.length; i++) {
      var px = parseFloat(images[i].getAttribute("data-font-px"));
      if (px > 0 && images[i].naturalWidth > 0) {
        smallest = Math.min(smallest, px * images[i].getBoundingClientRect().width / images[i].naturalWidth);
      }
    }
    document.body.setAttribute("data-min-plot-font", isFinite(smallest) ? smallest.toFixed(2) : "none");
    // Tables wider than their box hide columns behind a sideways scroll: count them.
    var boxes = document.querySelectorAll(".scroll"), clipped = [];
    for (i = 0; i < boxes.length; i++) {
      if (boxes[i].scrollWidth > boxes[i].clientWidth + 1) {
        var table = boxes[i].querySelector("table");
        clipped.push(table && table.id ? table.id : "table");
      }
    }
    document.body.setAttribute("data-clipped-tables", clipped.join(" "));
    for (f = 0; f < folds.length; f++) { folds[f].open = false; }
  }
  window.addEventListener("load", function () { loaded = true; mark(); });
})();
"""


def render_html(document: Document) -> str:
    """The whole page as one string; figures are read from their PNG files and embedded."""
    toc = "".join(f'<li><a href="#{section.anchor}">{_text(section.title)}</a></li>' for section in document.sections)
    body = "".join(_part(part) for part in document.intro)
    body += f'<nav aria-label="contents"><ul>{toc}</ul></nav>' if toc else ""
    body += "".join(_section(section, level=2) for section in document.sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_text(document.title)}</title>\n<style>{STYLE}</style>\n"
            f"<script>{CHECK_SCRIPT}</script>\n</head>\n<body>\n"
            f"<main class=\"wrap\">\n<h1>{_text(document.title)}</h1>\n{body}\n</main>\n</body>\n</html>\n")


def _section(section: Section, *, level: int) -> str:
    inner = "".join(_part(part) for part in section.parts)
    inner += "".join(_section(sub, level=min(level + 1, 6)) for sub in section.subsections)
    if section.folded:
        return (f'<details id="{html.escape(section.anchor)}">\n<summary>{_text(section.title)}</summary>\n{inner}'
                "</details>\n")
    return (f'<section id="{html.escape(section.anchor)}">\n<h{level}>{_text(section.title)}</h{level}>\n{inner}'
            "</section>\n")


def _part(part: Paragraph | Bullets | Table | Image) -> str:
    if isinstance(part, Paragraph):
        css = f' class="{part.kind}"' if part.kind != "text" else ""
        return f"<p{css}>{_text(part.text)}</p>\n"
    if isinstance(part, Bullets):
        css = f' class="{part.kind}"' if part.kind != "text" else ""
        items = "".join(f"<li>{_text(item)}</li>" for item in part.items)
        return f"<ul{css}>{items}</ul>\n"
    if isinstance(part, Table):
        return _table(part)
    if isinstance(part, Image):
        return _image(part.png, part.caption, part.font_px)
    if isinstance(part, Row):
        return '<div class="row">\n' + "".join(_image(image.png, image.caption, image.font_px)
                                                for image in part.images) + "</div>\n"
    raise TypeError(f"unknown document part {type(part).__name__}")


def _table(table: Table) -> str:
    columns = [str(c) for c in table.frame.columns]
    left = {columns[0], *table.text_columns} if columns else set()

    def cell(tag: str, column: str, value: object) -> str:
        css = ' class="text"' if column in left else ""
        return f"<{tag}{css}>{_text(str(value))}</{tag}>"

    head = "".join(cell("th", c, c) for c in columns)
    rows = "".join("<tr>" + "".join(cell("td", c, v) for c, v in zip(columns, record)) + "</tr>\n"
                   for record in table.frame.itertuples(index=False, name=None))
    caption = f"<caption>{_text(table.caption)}</caption>" if table.caption else ""
    return (f'<div class="scroll"><table id="{html.escape(table.table_id)}">{caption}<thead><tr>{head}</tr></thead>'
            f"\n<tbody>\n{rows}</tbody></table></div>\n")


def _image(path: Path, caption: str, font_px: float | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    font = f' data-font-px="{font_px:.2f}"' if font_px else ""
    return (f'<figure><img src="data:image/png;base64,{data}"{font} alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{_text(caption)}</figcaption></figure>\n")


def _text(text: str) -> str:
    return html.escape(text, quote=False)
