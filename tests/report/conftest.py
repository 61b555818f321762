"""Profiles to compare, made once per session with tiny random-init models on synthetic images.

* ``before``: timm's ``test_vit`` (6 blocks), k-NN and linear probes, cls and mean pooling;
* ``after``: the same architecture with other weights, loaded from RUN/refined.safetensors, with RUN/placement.json
  beside it (the layout `mimprobe refine` writes), so the report must find the placement through the checkpoint;
* ``deeper``: ``test_vit2`` (8 blocks, no CLS token: mean pooling only) on the same images, for the
  relative-depth comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import mimprobe
from mimprobe.placement import run_place

DATA = "synthetic:classes=4,train=20,test=8,size=16"  # per class: 80 train, 32 test images
OPTIONS = {"img_size": 32, "pool": ("cls", "mean")}


@dataclass(frozen=True)
class Profiles:
    before: Path
    after: Path
    deeper: Path
    run: Path


@pytest.fixture(scope="session")
def profiles(tmp_path_factory) -> Profiles:
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("profiles")
    common = dict(metrics="knn,linear", threads=1, progress=False, features=str(root / "features"), **OPTIONS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is 5x faster than two on a shared 2-core machine
    try:
        before = root / "before"
        mimprobe.profile("test_vit", DATA, out=str(before), **common)
        run = root / "run"
        run.mkdir()
        torch.manual_seed(1234)
        other = timm.create_model("test_vit", img_size=32, num_classes=0)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "refined.safetensors"))
        run_place(before, out=run / "placement.json", rule="last-n", n=3)
        after = root / "after"
        mimprobe.profile("test_vit", DATA, out=str(after), checkpoint=str(run / "refined.safetensors"), **common)
        deeper = root / "deeper"
        mimprobe.profile("test_vit2", DATA, out=str(deeper), **{**common, "pool": ("mean",)})
    finally:
        torch.set_num_threads(threads)
    return Profiles(before=before, after=after, deeper=deeper, run=run)


class _TableReader(HTMLParser):
    """Every <table id=...> of a page as a list of rows (header row first), cell text unescaped."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = dict(attrs).get("id") or f"table-{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="session")
def read_tables():
    """``read_tables(html) -> {table id: [[header...], [cells...], ...]}`` (no lxml or bs4 needed)."""

    def read(html: str) -> dict[str, list[list[str]]]:
        reader = _TableReader()
        reader.feed(html)
        return reader.tables

    return read
