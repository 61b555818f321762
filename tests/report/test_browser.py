"""report.html in a real browser (headless Chromium): every image decodes, no script or resource error, and the
page fits a phone-wide window (tables scroll inside their own box). Screenshots are kept as test artefacts:
under the test's tmp folder, and copied to $MIMPROBE_ARTIFACTS when that is set.

Skipped when no Chromium binary is installed (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from mimprobe.report import CompareConfig, run_compare

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)

pytestmark = pytest.mark.skipif(BROWSER is None, reason=f"no browser binary ({', '.join(BROWSERS)}) on PATH: "
                                                        "install one (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def page(profiles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser")
    run_compare([profiles.before, profiles.after], out=out / "report", config=CompareConfig(resamples=100))
    return out / "report" / "report.html"


def _chromium(page: Path, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    command = [BROWSER, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
               "--disable-extensions", f"--user-data-dir={tmp_path / 'chromium-profile'}",
               "--allow-file-access-from-files", "--virtual-time-budget=5000", *options, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


MIN_WINDOW = 500  # headless Chromium lays out at least 500 CSS px wide, whatever --window-size says


def _framed(page: Path, width: int, height: int) -> Path:
    """A page narrower than Chromium's smallest window: the report in an iframe of ``width`` CSS px, whose
    ``data-*`` body attributes the wrapper copies onto its own body once everything has loaded."""
    wrapper = page.with_name(f"{page.stem}-framed-{width}.html")
    wrapper.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">'
        f'<iframe id="page" src="{page.resolve().as_uri()}" style="width:{width}px;height:{height}px;border:0">'
        "</iframe><script>window.addEventListener('load', function () {"
        "var inner = document.getElementById('page').contentDocument.body;"
        "for (var i = 0; i < inner.attributes.length; i++) { var a = inner.attributes[i];"
        "if (a.name.indexOf('data-') === 0) { document.body.setAttribute(a.name, a.value); } } });"
        "</script></body></html>")
    return wrapper


def _body(dom: str) -> dict[str, str]:
    match = re.search(r"<body\b([^>]*)>", dom)
    assert match, f"no <body> in the dumped DOM: {dom[:300]!r}"
    return dict(re.findall(r'(data-[\w-]+)="([^"]*)"', match.group(1)))


@pytest.mark.parametrize("name, size", [("wide", (1280, 2400)), ("phone", (390, 2000))])
def test_every_image_loads_without_errors_and_the_page_fits(page, tmp_path, name, size):
    shot = tmp_path / f"report-{name}.png"
    window = (max(size[0], MIN_WINDOW), size[1])
    opened = page if size[0] >= MIN_WINDOW else _framed(page, *size)
    result = _chromium(opened, tmp_path, f"--window-size={window[0]},{window[1]}", "--enable-logging=stderr",
                       "--v=0", f"--screenshot={shot}", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    attributes = _body(result.stdout)
    assert attributes["data-viewport"] == str(size[0])  # the report was laid out at this width
    images = page.read_text().count("<img ")
    assert images >= 10 and attributes["data-images-ok"] == f"{images}/{images}"
    assert attributes["data-errors"] == "0"
    assert attributes["data-overflow"] == "false", f"the page is wider than a {size[0]} px window"
    # every table fits its box (no column hidden behind a sideways scroll), folded ones opened
    assert attributes["data-clipped-tables"] == "", f"tables wider than a {size[0]} px window: " \
                                                    f"{attributes['data-clipped-tables']}"
    # the smallest plot text, as rendered at this width, is readable
    assert float(attributes["data-min-plot-font"]) >= 10, attributes["data-min-plot-font"]
    assert "<details" in page.read_text()  # secondary curves and differences are folded
    console = [line for line in result.stderr.splitlines() if "Uncaught" in line or "Failed to load resource" in line]
    assert not console, console
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == window
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    artefacts = os.environ.get("MIMPROBE_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artefacts) / shot.name)
        shutil.copy(page, Path(artefacts) / "report.html")


def test_the_checks_catch_a_broken_page(page, tmp_path):
    """Negative control: a corrupt image, a script error and an over-wide block are all reported."""
    html = page.read_text()
    html = html.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    html = html.replace("<main class=\"wrap\">", "<main class=\"wrap\"><div style=\"width:3000px\">wide</div>"
                                                 "<script>undefinedFunction();</script>"
                                                 "<details><div class=\"scroll\"><table id=\"too-wide\"><tr><td>"
                                                 + "0123456789" * 60 + "</td></tr></table></div></details>", 1)
    html = re.sub(r'data-font-px="[0-9.]+"', 'data-font-px="4.00"', html)  # figures with tiny text
    broken = tmp_path / "broken.html"
    broken.write_text(html)
    attributes = _body(_chromium(_framed(broken, 390, 900), tmp_path, "--window-size=500,900", "--dump-dom").stdout)
    images = html.count("<img ")
    assert attributes["data-images-ok"] == f"{images - 1}/{images}"
    assert attributes["data-errors"] == "2"  # the script's ReferenceError and the image's decode error
    assert attributes["data-overflow"] == "true"
    assert attributes["data-clipped-tables"] == "too-wide"  # found although folded
    assert float(attributes["data-min-plot-font"]) < 4
