"""Label-free metrics inside the profile (issue 21): rows like every metric, the calibration against the labelled
curves equal to scipy's Spearman on the profile's own curves, and placement without labels."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from typer.testing import CliRunner

import mimprobe
from mimprobe.cli import app
from mimprobe.metrics.registry import LABEL_FREE_FAMILIES, label_free_curves

from tests.conftest import make_image_folder

DATA = "synthetic:classes=3,train=20,test=10,size=16,seed=1"
LABEL_FREE = ",".join(LABEL_FREE_FAMILIES)
runner = CliRunner()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    out = tmp_path_factory.mktemp("labelled") / "profile"
    mimprobe.profile("test_vit", DATA, out=str(out), img_size=32, pool="cls", metrics=f"knn,linear,{LABEL_FREE}",
                     labelfree_samples=40, threads=1, progress=False)
    return out


def test_label_free_rows_record_their_subset(labelled):
    table = pd.read_csv(labelled / "profile.csv", dtype={"params": str})
    for info in label_free_curves():
        if info.name == "rankme":  # its own subset (--rank-samples), recorded as max_samples
            continue
        rows = table[table["metric"] == info.name]
        assert not rows.empty, info.name
        assert set(rows["split"]) == {"train"}
        params = [json.loads(p) for p in rows["params"]]
        assert all(p.get("subset") == 40 and p.get("subset_seed") == 0 for p in params), info.name
    overlap = table[table["metric"] == "neighbourhood_overlap"]
    assert sorted(overlap["block"]) == list(range(5))  # the last block has no next block


def test_calibration_equals_scipy_spearman_on_the_profiles_curves(labelled):
    table = pd.read_csv(labelled / "profile.csv", dtype={"params": str})
    calibration = pd.read_csv(labelled / "calibration.csv")
    payload = json.loads((labelled / "profile.json").read_text())
    assert len(payload["calibration"]) == len(calibration) > 0
    checked = 0
    for record in calibration.to_dict(orient="records"):
        curve = table[(table["metric"] == record["metric"]) & (table["split"] == "train")
                      & (table["pooling"] == record["pooling"])].set_index("block")["value"]
        accuracy = table[(table["metric"] == record["against"]) & (table["split"] == record["split"])
                         & (table["pooling"] == record["pooling"])]
        if record["against"] == "knn_top1":
            accuracy = accuracy[accuracy["params"].map(lambda p: json.loads(p)["k"] == 10)]
        accuracy = accuracy.groupby("block")["value"].mean()
        blocks = [b for b in accuracy.index if b in curve.index and np.isfinite(curve[b])]
        expected = spearmanr(curve[blocks].to_numpy(), accuracy[blocks].to_numpy()).statistic
        if np.isfinite(expected):
            assert record["rho"] == pytest.approx(expected, abs=1e-12), record["metric"]
            assert record["rho_low"] <= record["rho_high"]
            checked += 1
        best = int(accuracy.idxmax())
        assert record["accuracy_lost"] == pytest.approx(accuracy[best] - accuracy[record["picked_block"]])
    assert checked > 0


def test_place_with_labels_says_where_the_label_free_rule_would_put_heads(labelled, tmp_path):
    result = runner.invoke(app, ["place", str(labelled), "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert "the label-free rule (twonn_id) would start the heads at block" in result.output
    assert "Spearman rho with k-NN top-1" in result.output


def test_place_label_free_on_an_unlabelled_image_folder(tmp_path):
    folder = make_image_folder(tmp_path / "flat", {"x": 12})
    for path in (folder / "x").iterdir():
        path.rename(folder / path.name)
    (folder / "x").rmdir()  # images with no class folders: unlabelled
    profile = tmp_path / "profile"
    done = runner.invoke(app, ["profile", "test_vit", str(folder), "--img-size", "32", "--pool", "cls", "--out",
                               str(profile), "--no-progress", "--threads", "1"])
    assert done.exit_code == 0, done.output
    table = pd.read_csv(profile / "profile.csv")
    assert "twonn_id" in set(table["metric"]) and "knn_top1" not in set(table["metric"])
    placed = runner.invoke(app, ["place", str(profile), "--rule", "label-free", "--out", str(tmp_path / "p.json")])
    assert placed.exit_code == 0, placed.output
    placement = json.loads((tmp_path / "p.json").read_text())
    assert placement["rule"] == "label-free" and placement["head_blocks"][-1] == 5
    assert "label-free rule: twonn_id" in placement["reason"] and "no labels in this profile" in placement["reason"]
    refused = runner.invoke(app, ["place", str(profile), "--out", str(tmp_path / "q.json")])
    assert refused.exit_code == 2 and not (tmp_path / "q.json").exists()  # the peak rule needs labels


@pytest.mark.slow  # a whole compare report of two profiles: 11 s on a quiet 2-core machine; CI runs it
def test_compare_report_has_the_label_free_section(labelled, tmp_path):
    mimprobe.compare([str(labelled), str(labelled)], out=str(tmp_path / "report"), labels="before,after", cka=False,
                     resamples=50)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Label-free vs labelled" in markdown
    calibration = pd.read_csv(labelled / "calibration.csv")
    knn = calibration[calibration["against"] == "knn_top1"]
    for record in knn.to_dict(orient="records"):
        if np.isfinite(record["rho"]):
            assert f"{record['rho']:+.2f} [{record['rho_low']:+.2f}, {record['rho_high']:+.2f}]" in markdown


def test_the_label_free_subset_is_cut_to_the_knn_queries_on_labelled_data():
    """Each label-free search compares the subset with itself; k-NN the bank with the queries: on labelled data the
    subset is cut to the evaluation split (not below 1,000 rows), so no search costs more than k-NN's."""
    from types import SimpleNamespace

    from mimprobe.metrics.config import ProfileConfig
    from mimprobe.metrics.profile import LABELFREE_FLOOR, _labelfree_size

    config = ProfileConfig(labelfree_samples=2000)
    plan = lambda queries: SimpleNamespace(eval_index=np.arange(queries))  # noqa: E731
    assert _labelfree_size(config, plan(1500), labelled=True) == 1500
    assert _labelfree_size(config, plan(300), labelled=True) == LABELFREE_FLOOR == 1000
    assert _labelfree_size(config, plan(50_000), labelled=True) == 2000
    assert _labelfree_size(config, plan(300), labelled=False) == 2000   # no k-NN to compare with
    assert _labelfree_size(ProfileConfig(labelfree_samples=None), plan(300), labelled=True) is None
