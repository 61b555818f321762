"""`mimprobe demo`: the packaged spec is analyses/demo.toml, and the fast configuration runs every step end to end
through the CLI, with the real report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mimprobe.cli import app
from mimprobe.metrics.intervals import wilson_interval
from mimprobe.pipeline import DEMO_SPEC, FAST_OVERRIDES, STEPS, api, load_spec

ANALYSES = Path(__file__).resolve().parents[2] / "analyses"
runner = CliRunner()


def test_packaged_demo_spec_is_analyses_demo():
    assert DEMO_SPEC.read_bytes() == (ANALYSES / "demo.toml").read_bytes()


def test_fast_demo_runs_every_step_through_the_cli(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--fast", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [(step["name"], step["status"]) for step in summary["steps"]] == [(s.name, "ran") for s in STEPS]
    assert "1/6 pretrain" in result.stderr and "6/6 compare" in result.stderr  # every step announced

    # every step read the previous one's output
    before = json.loads((out / "profile-before" / "profile.json").read_text())
    after = json.loads((out / "profile-after" / "profile.json").read_text())
    assert before["model"]["checkpoint"] == str(out / "pretrain" / "mae.pth")
    assert after["model"]["checkpoint"] == str(out / "refine" / "refined.safetensors")
    placement = json.loads((out / "placement" / "placement.json").read_text())
    refined = json.loads((out / "refine" / "refined.json").read_text())
    assert refined["head_blocks"] == placement["head_blocks"]
    compared = json.loads((out / "compare" / "compare.json").read_text())
    assert compared["inputs"] == [str((out / "profile-before").resolve()), str((out / "profile-after").resolve())]

    # the report, the headline and the notes on what the run shows
    assert Path(summary["report"]) == out / "compare" / "report.html"
    assert "<html" in Path(summary["report"]).read_text(encoding="utf-8").lower()
    knn = [row for row in summary["headline"] if row["metric"].startswith("k-NN")]
    assert knn and all(0 <= row[key] <= 1 for row in knn for key in ("before_best", "after_best", "after_last"))
    test_rows = [row for row in knn if row["split"] == "test"]   # with the report's paired interval
    assert test_rows and all(row["last_delta_low"] <= row["last_delta_high"] for row in test_rows)
    assert FAST_OVERRIDES["compare"]["notes"] in (out / "README.md").read_text()
    notes = " ".join(FAST_OVERRIDES["compare"]["notes"].split())
    for report in ("report.html", "report.md"):  # the report itself states what the run shows
        text = (out / "compare" / report).read_text(encoding="utf-8").replace("\\", "")  # markdown escapes
        assert notes[:60] in " ".join(text.split())

    # the resolved spec is the demo spec with the fast overrides and this out
    expected = replace(load_spec(DEMO_SPEC).with_overrides(FAST_OVERRIDES), out=str(out))
    assert load_spec(out / "spec.resolved.toml") == expected


@pytest.mark.slow
def test_demo_pretraining_peaks_before_the_last_block_beyond_the_intervals(tmp_path):
    """The demo's MAE (its own [pretrain] settings and data, one thread; about 80 s of CPU): k-NN top-1 of the CLS
    token on test peaks at an early block, and the last block's 95 % Wilson interval lies wholly below the peak's,
    the phenomenon the demo's notes describe (MIM-Refiner, arXiv 2402.10093, Fig. 1)."""
    spec = load_spec(DEMO_SPEC)
    pretrained = api.pretrain_mae(spec.model, spec.data, out=str(tmp_path / "pretrain"), progress=False,
                                  log=lambda line: None, **spec.options("pretrain"))
    api.profile(spec.model, spec.data, out=str(tmp_path / "profile"), checkpoint=str(pretrained.export),
                img_size=spec.img_size, metrics="knn", pool="cls", progress=False, log=lambda line: None)
    predictions = np.load(tmp_path / "profile" / "predictions.npz")
    rows = {json.loads(key)[1]: hits for key, hits in zip(predictions["keys__test"], predictions["hits__test"])
            if json.loads(key)[0] == "knn_top1" and json.loads(json.loads(key)[3])["k"] == 10}
    hits = np.stack([rows[block] for block in sorted(rows)])  # (blocks, test images)
    low, high = wilson_interval(hits.sum(axis=1), hits.shape[1])
    peak, last = int(hits.mean(axis=1).argmax()), len(hits) - 1
    assert peak <= last // 2, hits.mean(axis=1)
    assert high[last] < low[peak], (hits.mean(axis=1), low, high)
