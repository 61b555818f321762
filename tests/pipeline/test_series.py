"""`mimprobe profile --checkpoint SERIES`: three checkpoints of a tiny `pretrain-mae --save-every` run profiled in
epoch order, each equal to its single-checkpoint profile, stores reused on a second call, bad series refused before
anything is written, and the heatmaps drawing the table's values."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from mimprobe import BadInputError
from mimprobe.cli import app
from mimprobe.metrics.curves import Curve
from mimprobe.metrics.series_plot import series_figure, series_matrix
from mimprobe.pipeline import api
from mimprobe.pretrain import run_pretrain_mae

DATA = "synthetic:classes=2,train=10,test=6,size=16,seed=1"
TINY_MAE = dict(img_size=64, batch_size=4, decoder_dim=32, decoder_depth=1, decoder_heads=2, lr=1e-3,
                warmup_epochs=0.5)
PROFILE = dict(img_size=64, metrics="knn", pool="cls", threads=1, progress=False)
KEY = ["split", "block", "pooling", "metric", "params"]
runner = CliRunner()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """10 epochs kept every 4th and at the end: checkpoint-4, -8, -10 (lexical order would put 10 first)."""
    out = tmp_path_factory.mktemp("mae") / "run"
    run_pretrain_mae("test_vit", DATA, out=out, epochs=10, save_every=4, progress=False, **TINY_MAE)
    return out


@pytest.fixture(scope="module")
def series(run_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    first = api.profile("test_vit", DATA, checkpoint=str(run_folder / "checkpoint-*.pth"), out=str(out), **PROFILE)
    return out, first


def test_save_every_keeps_the_epochs_and_the_last(run_folder):
    names = sorted(path.name for path in run_folder.glob("checkpoint-*.pth"))
    assert names == ["checkpoint-10.pth", "checkpoint-4.pth", "checkpoint-8.pth", "checkpoint-last.pth"]
    state = torch.load(run_folder / "checkpoint-8.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (8, 8 * 5)   # 20 train images, batch 4: 5 steps per epoch


def test_series_table_has_every_checkpoint_in_epoch_order(series):
    out, result = series
    table = result.table
    assert [item.name for item in result.checkpoints] == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    assert list(dict.fromkeys(table["checkpoint"])) == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    assert list(dict.fromkeys(table["checkpoint_step"])) == [4, 8, 10]
    assert (np.diff(table["checkpoint_order"].to_numpy()) >= 0).all()
    num_blocks = len(timm.create_model("test_vit").blocks)
    curve = table[(table["metric"] == "knn_top1") & (table["split"] == "test")
                  & table["params"].str.contains('"k":10')]
    assert len(curve) == 3 * num_blocks
    assert curve.groupby("checkpoint")["block"].apply(sorted).map(tuple).nunique() == 1
    for name in ("series.csv", "series.parquet", "series.png", "series.json"):
        assert (out / name).is_file()
    for item in result.checkpoints:
        assert (out / "checkpoints" / item.name / "profile.csv").is_file()


def test_each_checkpoint_equals_its_single_profile(series, run_folder, tmp_path):
    _, result = series
    single = api.profile("test_vit", DATA, checkpoint=str(run_folder / "checkpoint-8.pth"), out=str(tmp_path / "one"),
                         features=str(tmp_path / "features"), **PROFILE)  # a store of its own: extracted anew
    part = result.table[result.table["checkpoint"] == "checkpoint-8"]
    merged = part.merge(single.table, on=KEY, suffixes=("_series", "_single"))
    assert len(merged) == len(single.table) == len(part)
    np.testing.assert_array_equal(merged["value_series"], merged["value_single"])
    others = result.table[result.table["checkpoint"] == "checkpoint-4"].merge(single.table, on=KEY)
    assert not np.array_equal(others["value_x"], others["value_y"])  # the checkpoints differ: the test can tell


def test_a_second_call_reuses_every_store(series, run_folder):
    out, first = series
    assert first.reused == [False, False, False]
    stores = [profile.store.path for profile in first.profiles]
    assert len(set(stores)) == 3
    stamps = {path: path.stat().st_mtime_ns for store in stores for path in store.glob("*.npy")}
    again = api.profile("test_vit", DATA, checkpoint=str(run_folder), out=str(out), **PROFILE)  # the run folder
    assert again.reused == [True, True, True]
    assert [profile.store.path for profile in again.profiles] == stores
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    np.testing.assert_array_equal(again.table["value"], first.table["value"])


def test_heatmaps_draw_the_table_values(series):
    _, result = series
    names = [item.name for item in result.checkpoints]
    headline = Curve.of("knn_top1", "test", {"preset": "mim-refiner", "k": 10})
    blocks, values = series_matrix(result.table, headline, "cls", names)
    for column, name in enumerate(names):
        rows = result.table[(result.table["checkpoint"] == name) & (result.table["metric"] == "knn_top1")
                            & (result.table["split"] == "test") & result.table["params"].str.contains('"k":10')]
        np.testing.assert_allclose(values[:, column], rows.sort_values("block")["value"].to_numpy())
    figure = series_figure(result.table, [headline], checkpoints=names, title="t")
    image = figure.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(image), values * 100)
    assert [tick.get_text() for tick in figure.axes[0].get_xticklabels()] == names


def test_bad_series_are_refused_before_anything_is_written(run_folder, tmp_path):
    out = tmp_path / "out"

    def refused(checkpoint, match):
        result = runner.invoke(app, ["profile", "test_vit", DATA, "--checkpoint", str(checkpoint), "--out", str(out),
                                     "--img-size", "64", "--metrics", "knn", "--no-progress"])
        assert result.exit_code == 2, result.output
        assert match in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()

    refused(tmp_path / "nothing-*.pth", "matches no file")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_folder / "checkpoint-last.pth", bare)
    refused(bare, "without numbered checkpoints")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(run_folder / "checkpoint-4.pth", mixed / "checkpoint-1.pth")
    wider = timm.create_model("test_vit", num_classes=0, img_size=64, embed_dim=128)
    torch.save({"model": wider.state_dict()}, mixed / "checkpoint-2.pth")
    refused(mixed, "mixes architectures")
    with pytest.raises(BadInputError, match="mixes architectures"):
        api.profile("test_vit", DATA, checkpoint=str(mixed / "checkpoint-*.pth"), out=str(out), **PROFILE)
    assert not out.exists()


def test_compare_reads_a_series_as_its_checkpoints_profiles(series, tmp_path):
    from mimprobe.report import CompareConfig, run_compare

    out, result = series
    report = run_compare([out], out=tmp_path / "report", config=CompareConfig(resamples=20, cka=False))
    assert [profile.label for profile in report.profiles] == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    assert [profile.folder for profile in report.profiles] == [profile.out for profile in result.profiles]
    table = report.table[report.table["side"] != "delta"]
    np.testing.assert_allclose(table["relative_depth"], table["block"] / (table["block"].max()))
