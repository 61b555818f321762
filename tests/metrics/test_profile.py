"""`mimprobe profile`: the long table, its files, the best blocks, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mimprobe import extract
from mimprobe.cli import app
from mimprobe.metrics.headlines import best_blocks
from mimprobe.metrics.profile import COLUMNS, ProfileConfig
from mimprobe.pipeline.profiling import run_profile
from tests.conftest import make_image_folder

runner = CliRunner()
DATA = "synthetic:classes=4,train=30,test=10,size=16,seed=1"  # seed 1: k-NN on val stays below 100 % (leak test)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stores")
    return extract("test_vit", DATA, out=out, img_size=32, pool=("cls", "mean"), progress=False).store.path


def test_profile_files_have_the_documented_columns(store_dir, tmp_path):
    result = run_profile(store_dir, out=tmp_path, config=ProfileConfig(), progress=False)
    for name in ("profile.csv", "profile.parquet", "profile.json", "profile.png"):
        assert (tmp_path / name).is_file()
    csv = pd.read_csv(tmp_path / "profile.csv")
    parquet = pd.read_parquet(tmp_path / "profile.parquet")
    assert list(csv.columns) == COLUMNS == list(parquet.columns)
    assert len(csv) == len(parquet) == len(result.table)
    assert set(csv["block"]) == set(range(6)) and set(csv["pooling"]) == {"cls", "mean"}
    metrics = set(csv["metric"])
    for metric in ("knn_top1", "knn_top5", "linear_top1", "lowshot_top1_mean", "cluster_acc", "cluster_nmi",
                   "rankme"):
        assert metric in metrics
    assert {"test", "val", "train"} <= set(csv["split"])
    knn = csv[(csv["metric"] == "knn_top1") & (csv["split"] == "test")]
    assert all(json.loads(p)["preset"] == "mim-refiner" for p in knn["params"])
    payload = json.loads((tmp_path / "profile.json").read_text())
    assert payload["store_key"] == json.loads((store_dir / "manifest.json").read_text())["key"]
    assert payload["columns"] == COLUMNS and "torch" in payload["versions"]


def test_best_blocks_are_the_argmax_of_each_curve(store_dir, tmp_path):
    result = run_profile(store_dir, out=tmp_path, config=ProfileConfig(metrics=("knn", "rank")), progress=False)
    table = result.table
    for record in result.best.to_dict(orient="records"):
        if record["metric"].startswith("k-NN") and "val" not in record["metric"]:
            rows = table[(table["metric"] == "knn_top1") & (table["split"] == "test") &
                         (table["pooling"] == record["pooling"]) & table["params"].str.contains('"k":10')]
            curve = rows.set_index("block")["value"]
            assert record["best_value"] == pytest.approx(curve.max())
            assert curve[record["best_block"]] == pytest.approx(curve.max())
    assert set(best_blocks(table, "mim-refiner")["pooling"]) == {"cls", "mean"}


def test_profile_cli_on_a_model_and_data(tmp_path):
    result = runner.invoke(app, ["profile", "test_vit", DATA, "--out", str(tmp_path), "--img-size", "32",
                                 "--metrics", "knn,rank", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "best blocks" in result.stdout and "k-NN top-1" in result.stdout
    assert (tmp_path / "features").is_dir() and (tmp_path / "profile.png").is_file()
    again = runner.invoke(app, ["profile", "test_vit", DATA, "--out", str(tmp_path), "--img-size", "32",
                                "--metrics", "rank", "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["rows"] == 12 and "reusing feature store" in again.stderr


def _bad(args):
    result = runner.invoke(app, ["profile", *args, "--no-progress"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_k_larger_than_the_train_split(tmp_path):
    store = extract("test_vit", "synthetic:classes=2,train=3,test=2,size=16", out=tmp_path, img_size=32,
                    progress=False).store
    assert re.fullmatch(r"error: k-NN preset mim-refiner needs k=10 neighbours but the smallest bank is the fit "
                        r"part of train for k-NN on val \(4 images\): use more train images, or --metrics without knn",
                        _bad([str(store.path), "--out", str(tmp_path / "p"), "--metrics", "knn"]))
    assert not (tmp_path / "p").exists()


def test_single_class_and_missing_labels(store_dir, tmp_path):
    import shutil

    single = tmp_path / "single"
    shutil.copytree(store_dir, single)
    np.save(single / "train" / "labels.npy", np.zeros(120, dtype=np.int64))
    assert "single class" in _bad([str(single), "--out", str(tmp_path / "p1")])
    folder = make_image_folder(tmp_path / "flat", {"x": 6})
    for path in (folder / "x").iterdir():
        path.rename(folder / path.name)
    (folder / "x").rmdir()
    unlabelled = extract("test_vit", folder, out=tmp_path / "s", img_size=32, progress=False).store
    assert "no labels" in _bad([str(unlabelled.path), "--out", str(tmp_path / "p2"), "--metrics", "knn"])
    ok = runner.invoke(app, ["profile", str(unlabelled.path), "--out", str(tmp_path / "p3"), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    from mimprobe.metrics.registry import LABEL_FREE_FAMILIES, METRIC_INFO

    found = set(pd.read_csv(tmp_path / "p3" / "profile.csv")["metric"])  # the label-free metrics only
    assert {"rankme", "twonn_id", "nesum", "dataset_entropy", "cluster_learnability"} <= found  # 6 rows: no alpha
    assert all(METRIC_INFO[name].family in LABEL_FREE_FAMILIES for name in found)


def test_nan_features_are_named_by_block(store_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(store_dir, broken)
    features = np.load(broken / "train" / "block03_mean.npy", mmap_mode="r+")
    features[5, 2] = np.nan
    features.flush()
    del features
    line = _bad([str(broken), "--out", str(tmp_path / "p")])
    assert "block 3 (mean) of split train has NaN or Inf" in line


def test_store_from_another_dataset(store_dir, tmp_path):
    assert "was extracted from synthetic, not from digits" in _bad([str(store_dir), "digits", "--out", str(tmp_path)])


def test_unknown_metric_and_preset(store_dir, tmp_path):
    assert "unknown --metrics value 'knm'" in _bad([str(store_dir), "--out", str(tmp_path), "--metrics", "knm"])
    assert "unknown --preset value 'byol'" in _bad([str(store_dir), "--out", str(tmp_path), "--preset", "byol"])


def test_a_small_memory_budget_gives_the_same_table(store_dir):
    """Every metric reads the store's memory maps in chunks under the budget; the numbers do not change."""
    from mimprobe.features.store import FeatureStore
    from mimprobe.metrics.profile import profile_store

    store = FeatureStore.open(store_dir)
    config = dict(metrics=("knn", "linear", "lowshot", "cluster", "rank"), poolings=("cls",))
    whole = profile_store(store, ProfileConfig(memory_budget=None, **config), progress=False)
    budget = 20 * 6 * 64 * 4 * 3  # 20 rows of the 6 blocks at a time, for 120 train rows
    chunked = profile_store(store, ProfileConfig(memory_budget=budget, **config), progress=False)
    def values(table):  # the probe records the budget in its params: leave it out of the key
        return {(r.split, r.block, r.pooling, r.metric,
                 json.dumps({k: v for k, v in json.loads(r.params).items() if k != "memory_budget"}, sort_keys=True),
                 r.seed):
                r.value for r in table.itertuples()}

    whole_values, chunked_values = values(whole), values(chunked)
    assert len(whole_values) == len(whole) and sorted(whole_values) == sorted(chunked_values)
    for key, value in whole_values.items():
        assert chunked_values[key] == pytest.approx(value, abs=1e-9), key


def test_subsample_sizes_are_options_recorded_in_the_rows(store_dir):
    from mimprobe.features.store import FeatureStore
    from mimprobe.metrics.profile import profile_store

    store = FeatureStore.open(store_dir)
    table = profile_store(store, ProfileConfig(metrics=("cluster", "lowshot"), poolings=("cls",), eval_samples=25),
                          progress=False)
    assert all(json.loads(p)["eval_samples"] == 25 for p in table["params"])
    full = profile_store(store, ProfileConfig(metrics=("cluster",), poolings=("cls",)), progress=False)
    assert all("eval_samples" not in json.loads(p) for p in full["params"])  # 40 test rows < 50,000: all used
    with pytest.raises(Exception, match="--eval-samples must be at least 1"):
        ProfileConfig(eval_samples=0)


def test_a_labelled_train_only_folder_profiles_with_leave_one_out(tmp_path):
    """A labelled dataset without a test split: k-NN leave-one-out on train, the rest on a 20 % hold-out, and the
    placement's val curve from a validation split outside the hold-out (it used to be empty: a crash)."""
    from mimprobe.features.store import FeatureStore
    from mimprobe.metrics.profile import plan_splits, profile_store

    folder = make_image_folder(tmp_path / "images", {"a": 12, "b": 12, "c": 12}, size=16)
    store = extract("test_vit", str(folder), out=tmp_path / "stores", img_size=32, progress=False).store
    store = FeatureStore.open(store.path)
    plan = plan_splits(store, val_fraction=0.1, seed=0)
    assert len(plan.val_index) > 0 and not set(plan.val_index) & set(plan.eval_index)
    assert not set(plan.val_index) & set(plan.fit_index) and set(plan.fit_index) | set(plan.val_index) == set(
        plan.train_index)
    table = profile_store(store, ProfileConfig(metrics=("knn", "linear")), progress=False)
    assert {"train-loo", "val", "train-holdout"} <= set(table["split"])
    # leave-one-out: each image is searched among the others, never finding itself (which would read 100 %)
    from mimprobe.metrics import knn

    labels = store.labels("train")
    value = lambda found: next(r.value for r in found if r.metric == "knn_top1" and r.params["k"] == 10)
    below_one = []
    for block in store.blocks:
        train = np.asarray(store.features("train", block, "cls"), dtype=np.float32)
        row = table[(table["metric"] == "knn_top1") & (table["split"] == "train-loo") & (table["block"] == block)
                    & (table["pooling"] == "cls") & table["params"].str.contains('"k":10')]
        expected = knn.evaluate_knn(train, labels, train, labels, preset="mim-refiner", split="train-loo",
                                    exclude_self=True, class_names=store.classes)
        finds_itself = knn.evaluate_knn(train, labels, train, labels, preset="mim-refiner", split="train-loo",
                                        class_names=store.classes)
        assert row["value"].item() == pytest.approx(value(expected))
        assert value(finds_itself) == 1.0
        below_one.append(value(expected) < 1.0)
    assert any(below_one)


def test_the_placement_val_curve_never_searches_the_val_rows(store_dir):
    """k-NN on val uses the fit rows alone as its bank: with the val rows in the bank every image would find
    itself (similarity 1) and the curve would read about 100 %."""
    from mimprobe.features.store import FeatureStore
    from mimprobe.metrics import knn
    from mimprobe.metrics.profile import plan_splits, profile_store

    store = FeatureStore.open(store_dir)
    table = profile_store(store, ProfileConfig(metrics=("knn",), poolings=("cls",)), progress=False)
    plan = plan_splits(store, val_fraction=0.1, seed=0)
    labels = store.labels("train")
    differs = []
    for block in range(6):
        train = np.asarray(store.features("train", block, "cls"), dtype=np.float32)
        rows = table[(table["metric"] == "knn_top1") & (table["split"] == "val") & (table["block"] == block)
                     & table["params"].str.contains('"k":10')]
        expected = knn.evaluate_knn(train[plan.fit_index], labels[plan.fit_index], train[plan.val_index],
                                    labels[plan.val_index], preset="mim-refiner", split="val",
                                    class_names=store.classes)
        leaked = knn.evaluate_knn(train, labels, train[plan.val_index], labels[plan.val_index],
                                  preset="mim-refiner", split="val", class_names=store.classes)
        value = lambda found: next(r.value for r in found if r.metric == "knn_top1" and r.params["k"] == 10)
        assert rows["value"].item() == pytest.approx(value(expected))
        assert value(leaked) == 1.0  # every val image finds itself
        differs.append(value(expected) < 1.0)
    assert any(differs)


def test_cli_memory_budget_and_subset_options(store_dir, tmp_path):
    result = runner.invoke(app, ["profile", str(store_dir), "--out", str(tmp_path / "p"), "--metrics", "knn,cluster",
                                 "--memory-budget", "64K", "--eval-samples", "20", "--no-progress"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert payload["config"]["memory_budget"] == 65536 and payload["config"]["eval_samples"] == 20
    table = pd.read_csv(tmp_path / "p" / "profile.csv")
    assert all(json.loads(p)["eval_samples"] == 20 for p in table[table["metric"] == "cluster_acc"]["params"])
    bad = runner.invoke(app, ["profile", str(store_dir), "--out", str(tmp_path / "q"), "--memory-budget", "lots"])
    assert bad.exit_code == 2 and "--memory-budget 'lots' is not a size" in bad.output
    assert not (tmp_path / "q").exists()


def test_skipped_images_are_left_out_of_every_metric(tmp_path):
    """A store with an undecodable image (its row zeroed, label -1): the profile reads the valid rows only, so its
    k-NN and low-shot rows equal the metrics run on `FeatureStore.features` (which drops the skipped rows)."""
    from mimprobe.features.store import FeatureStore
    from mimprobe.metrics import knn
    from mimprobe.metrics.profile import profile_store

    folder = make_image_folder(tmp_path / "imgs" / "train", {"a": 12, "b": 12, "c": 12}, size=16)
    make_image_folder(tmp_path / "imgs" / "test", {"a": 4, "b": 4, "c": 4}, size=16, seed=1)
    (folder / "a" / "001.png").write_bytes(b"\x89PNG broken")  # row 1 of train
    store = extract("test_vit", str(tmp_path / "imgs"), out=tmp_path / "stores", img_size=32, skip_bad_images=True,
                    progress=False).store
    store = FeatureStore.open(store.path)
    assert len(store.manifest["bad_images"]) == 1
    from mimprobe.metrics.profile import StoreViews, plan_splits

    plan = plan_splits(store, val_fraction=0.1, seed=0)
    views = StoreViews(store, plan)
    train, test = np.asarray(store.features("train", 3)), np.asarray(store.features("test", 3))
    for name, source, index in (("train", train, np.arange(len(train))), ("bank", train, plan.train_index),
                                ("fit", train, plan.fit_index), ("val", train, plan.val_index),
                                ("eval", test, plan.eval_index)):
        np.testing.assert_array_equal(np.asarray(views.rows(name, 3, "cls")[:]), source[index], err_msg=name)
    table = profile_store(store, ProfileConfig(metrics=("knn",), poolings=("cls",), preset="dino"), progress=False)
    for block in (0, 5):
        expected = knn.evaluate_knn(store.features("train", block), store.labels("train"),
                                    store.features("test", block),
                                    store.labels("test"), preset="dino", split="test", class_names=store.classes)
        value = next(r.value for r in expected if r.metric == "knn_top1")
        rows = table[(table["metric"] == "knn_top1") & (table["split"] == "test") & (table["block"] == block)]
        assert rows["value"].item() == pytest.approx(value)


def test_one_progress_bar_per_metric_on_stderr_hidden_by_no_progress_and_json(store_dir, tmp_path):
    """Not on a terminal, each metric's bar is a plain line on stderr when it completes (as extract's and refine's);
    stdout keeps the results; --no-progress and --json hide them."""
    args = ["profile", str(store_dir), "--metrics", "knn,rank"]
    shown = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    manifest = json.loads((store_dir / "manifest.json").read_text())
    steps = len(manifest["blocks"]) * len(manifest["poolings"])  # one step per block and pooling
    for metric in ("knn", "rank"):
        (line,) = [line for line in shown.stderr.splitlines() if line.startswith(f"{metric} ")]
        assert re.fullmatch(rf"{metric} {steps}/{steps} \(100 %\)  seconds [0-9.]+  elapsed \S+  ETA 0:00:00", line)
    assert not re.search(r"^(knn|rank) \d+/", shown.stdout, flags=re.M)

    for hide in ("--no-progress", "--json"):
        hidden = runner.invoke(app, [*args, "--out", str(tmp_path / hide.strip("-")), hide])
        assert hidden.exit_code == 0, hidden.output
        assert not re.search(r"^(knn|rank) \d+/", hidden.stderr + hidden.stdout, flags=re.M)
