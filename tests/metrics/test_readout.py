"""Multi-block readouts (``--readout``): DINOv2's linear-evaluation input and the all-block readout.

The reference is built by hand from a forward pass, exactly as DINOv2's ``create_linear_input``
(facebookresearch/dinov2, dinov2/eval/linear.py) builds it from ``get_intermediate_layers(..., norm=True)``: the
class tokens of the last n blocks, then the mean of the last block's patch tokens; it is probed with scikit-learn's
LogisticRegression, C tuned on the same validation split over the same grid.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from mimprobe import extract, load_data, load_model
from mimprobe.cli import app
from mimprobe.data import SplitDataset, build_eval_transform
from mimprobe.errors import BadInputError
from mimprobe.metrics._block_rows import ConcatenatedRows, RowSubset
from mimprobe.metrics._rows import carve_validation
from mimprobe.metrics.curves import table_curves
from mimprobe.metrics.headlines import best_blocks, headline_curve, headlines
from mimprobe.metrics.linear_solver import DEFAULT_C_VALUES
from mimprobe.metrics.profile import ProfileConfig, profile_store
from mimprobe.metrics.readout import DINOV2_READOUTS, Readout, dinov2_inputs, parse_readouts
from mimprobe.models.preprocessing import resolve_eval_data_config
from mimprobe.pipeline.profiling import run_profile
from mimprobe.placement.curve import validation_curve
from tests.conftest import unpack_cifar

runner = CliRunner()
SMALL = "synthetic:classes=4,train=30,test=10,size=16,seed=1"
ONE_POINT = 0.01 + 1e-9         # top-1 within 1 point, inclusive (5 of the 500 test images of `noisy_patterns`)
REGISTERS = {"reg_tokens": 4}   # prefix tokens besides CLS, as DINOv2 with registers: left out of the mean


def noisy_patterns(path, *, classes: int = 10, train: int = 200, test: int = 50, size: int = 16,
                   amplitude: float = 25.0, noise: float = 60.0, seed: int = 0):
    """A .npz data set whose classes are a faint blocky colour pattern each under strong pixel noise: 2,000 train
    and 500 test images (1 point = 5 images) that a probe of a random ViT's readouts classifies to about 89 %
    with C near the middle of the grid: not separable, so that the regularised optimum decides, not the
    solver's path (on separable features, the batched probe's and lbfgs's weakly regularised heads differ)."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(classes, size // 4, size // 4, 3)).repeat(4, axis=1).repeat(4, axis=2)

    def draw(per_class: int):
        labels = np.repeat(np.arange(classes), per_class)
        pixels = 128 + amplitude * patterns[labels] + rng.normal(0, noise, (len(labels), size, size, 3))
        return np.clip(pixels, 0, 255).round().astype(np.uint8), labels

    (x_train, y_train), (x_test, y_test) = draw(train), draw(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def dinov2_linear_input(model, images: torch.Tensor, *, n: int, avgpool: bool) -> np.ndarray:
    """(batch, n * dim [+ dim]) DINOv2's linear input, by hand: timm's ``get_intermediate_layers`` (DINO's
    interface) with the final norm gives each of the last n blocks as (patch tokens, prefix tokens); the class
    token is prefix token 0 (registers follow it), and ``avgpool`` appends the last block's mean patch token."""
    with torch.inference_mode():
        layers = model.get_intermediate_layers(images, n, return_prefix_tokens=True, norm=True)
    parts = [prefix[:, 0] for _, prefix in layers]
    if avgpool:
        parts.append(layers[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1).float().numpy()


def model_inputs(model, source, split: str) -> torch.Tensor:
    """The split's images as the extraction preprocesses them."""
    transform = build_eval_transform(resolve_eval_data_config(model, img_size=32))
    dataset = SplitDataset(source.splits[split], transform, (3, 32, 32))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def tuned_logistic_regression(train_x, train_y, test_x, test_y, *, seed: int = 0, val_fraction: float = 0.1,
                              widen_points: int = 2, max_widenings: int = 3) -> tuple[float, float]:
    """scikit-learn's probe tuned as the profile tunes its own (`mimprobe.metrics.linear`, steps 1-4): C chosen on
    the profile's validation split over its grid (highest accuracy, ties: lowest cross-entropy, then the smaller
    C), the grid widened by 2 values at its spacing past an edge where the accuracy still rises (at most 3 times),
    then a refit on all of train: (test top-1, chosen C)."""
    fit, val = carve_validation(train_y, fraction=val_fraction, seed=seed)
    scaler = StandardScaler().fit(train_x[fit])
    fit_z, val_z = scaler.transform(train_x[fit]), scaler.transform(train_x[val])

    def score(c: float) -> tuple[float, float]:
        model = LogisticRegression(C=c, max_iter=5000).fit(fit_z, train_y[fit])
        return model.score(val_z, train_y[val]), log_loss(train_y[val], model.predict_proba(val_z),
                                                          labels=model.classes_)

    grid = sorted(DEFAULT_C_VALUES)
    ratio = grid[1] / grid[0]
    scores = {c: score(c) for c in grid}
    for _ in range(max_widenings):
        searched = sorted(scores)
        best = min(searched, key=lambda c: (-scores[c][0], scores[c][1], c))
        if best == searched[-1] and scores[best][0] > scores[searched[-2]][0]:
            more = [best * ratio ** (k + 1) for k in range(widen_points)]
        elif best == searched[0] and scores[best][0] > scores[searched[1]][0]:
            more = [best / ratio ** (k + 1) for k in range(widen_points)]
        else:
            break
        scores.update({c: score(c) for c in more})
    chosen = min(scores, key=lambda c: (-scores[c][0], scores[c][1], c))
    final = make_pipeline(StandardScaler(), LogisticRegression(C=chosen, max_iter=5000)).fit(train_x, train_y)
    return float(final.score(test_x, test_y)), chosen


def readout_row(table: pd.DataFrame, name: str, pooling: str = "cls", metric: str = "linear_readout_top1"):
    rows = table[(table["metric"] == metric) & (table["pooling"] == pooling)]
    rows = rows[rows["params"].map(lambda p: json.loads(p)["readout"] == name)]
    assert len(rows) == 1, (name, pooling, metric)
    return rows.iloc[0]


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory):
    return str(noisy_patterns(tmp_path_factory.mktemp("data") / "noisy.npz"))


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory, noisy_data):
    return extract("test_vit", noisy_data, out=tmp_path_factory.mktemp("stores"), img_size=32, pool=("cls", "mean"),
                   norm="final", store_dtype="float32", model_kwargs=REGISTERS, progress=False).store


@pytest.fixture(scope="module")
def final_store(tmp_path_factory):
    return extract("test_vit", SMALL, out=tmp_path_factory.mktemp("stores"), img_size=32, pool=("cls", "mean"),
                   norm="final", progress=False).store


@pytest.fixture(scope="module")
def profiled(final_store):
    config = ProfileConfig(metrics=("knn", "linear"), readout="last1,last4+avg,all")
    return profile_store(final_store, config, progress=False)


def test_readout_features_are_dinov2s_linear_input(noisy_store, noisy_data):
    model = load_model("test_vit", img_size=32, model_kwargs=REGISTERS).model.eval()
    assert model.num_prefix_tokens == 5  # CLS + 4 registers: the mean must leave all five out
    images = model_inputs(model, load_data(noisy_data), "test")
    for name, (n, avgpool) in (("last1", (1, False)), ("last4", (4, False)), ("last1+avg", (1, True)),
                               ("last4+avg", (4, True))):
        readout = Readout(name, "cls", dinov2_inputs(name, 6))
        ours = np.asarray(readout.features(lambda block, pooling: noisy_store.features("test", block, pooling)))
        np.testing.assert_allclose(ours, dinov2_linear_input(model, images, n=n, avgpool=avgpool), atol=1e-5)
    assert dinov2_inputs("last4+avg", 12) == ((8, "cls"), (9, "cls"), (10, "cls"), (11, "cls"), (11, "mean"))


def hand_built_references(store, data, names) -> dict[str, float]:
    """{readout: test top-1 of the tuned scikit-learn probe on DINOv2's input built by hand from the model}."""
    model = load_model("test_vit", img_size=32, model_kwargs=REGISTERS).model.eval()
    source = load_data(data)
    train_images, test_images = model_inputs(model, source, "train"), model_inputs(model, source, "test")
    references = {}
    for name in names:
        n, avgpool = DINOV2_READOUTS[name]
        references[name] = tuned_logistic_regression(
            dinov2_linear_input(model, train_images, n=n, avgpool=avgpool), store.labels("train"),
            dinov2_linear_input(model, test_images, n=n, avgpool=avgpool), store.labels("test"))[0]
    return references


@pytest.fixture(scope="module")
def noisy_references(noisy_store, noisy_data):
    return hand_built_references(noisy_store, noisy_data, ("last1+avg", "last4+avg"))


def test_readout_rows_match_sklearn_on_the_hand_built_input(noisy_store, noisy_references):
    table = profile_store(noisy_store, ProfileConfig(metrics=("linear",), readout="last1+avg,last4+avg"),
                          progress=False)
    for name, reference in noisy_references.items():
        assert 0.5 < reference < 0.97, "neither chance nor trivially separable"
        assert readout_row(table, name)["value"] == pytest.approx(reference, abs=ONE_POINT), name
    row = readout_row(table, "last4+avg")
    params = json.loads(row["params"])
    assert row["block"] == 5 and row["split"] == "test"
    assert params["blocks"] == [2, 3, 4, 5] and params["poolings"] == ["cls", "mean"]
    assert params["inputs"] == [[2, "cls"], [3, "cls"], [4, "cls"], [5, "cls"], [5, "mean"]]
    assert params["grid_c"] == sorted(DEFAULT_C_VALUES) and params["C"] in params["grid_c_searched"]
    val = readout_row(table, "last4+avg", metric="linear_readout_val_top1")
    assert val["split"] == "val" and json.loads(val["params"]) == params


@pytest.mark.slow
def test_the_sklearn_probe_path_trains_the_readouts_too(noisy_store, noisy_references):
    table = profile_store(noisy_store, ProfileConfig(metrics=("linear",), probe="sklearn", poolings=("cls",),
                                                     readout="last1+avg,last4+avg"), progress=False)
    for name, reference in noisy_references.items():
        row = readout_row(table, name)
        assert json.loads(row["params"])["probe"] == "sklearn-lbfgs"
        # the same solver as the reference; C may still differ where validation accuracies tie to an image
        assert row["value"] == pytest.approx(reference, abs=ONE_POINT), name


def test_last1_is_the_last_blocks_cls_probe_and_all_reads_every_block(profiled):
    per_block = profiled[(profiled["metric"] == "linear_top1") & (profiled["pooling"] == "cls")
                         & (profiled["block"] == 5)].iloc[0]
    last1 = readout_row(profiled, "last1")
    assert last1["value"] == per_block["value"]  # the same features, the same heads in the same pass
    assert json.loads(last1["params"])["C"] == json.loads(per_block["params"])["C"]
    for pooling in ("cls", "mean"):
        params = json.loads(readout_row(profiled, "all", pooling)["params"])
        assert params["blocks"] == list(range(6)) and params["poolings"] == [pooling]


def test_readout_rows_leave_the_per_block_curves_and_placement_alone(final_store, profiled):
    plain = profile_store(final_store, ProfileConfig(metrics=("knn", "linear")), progress=False)
    readout = profiled["metric"].str.startswith("linear_readout")
    assert readout.sum() == 2 * 4  # last1, last4+avg (cls) and all per pooling, a test and a val row each
    pd.testing.assert_frame_equal(profiled[~readout].reset_index(drop=True), plain)
    assert headlines("mim-refiner", profiled) == headlines("mim-refiner", plain)
    for headline in headlines("mim-refiner", profiled):
        for pooling in ("cls", "mean"):
            pd.testing.assert_frame_equal(headline_curve(profiled, headline, pooling).drop(columns="hits"),
                                          headline_curve(plain, headline, pooling).drop(columns="hits"))
    pd.testing.assert_frame_equal(best_blocks(profiled, "mim-refiner"), best_blocks(plain, "mim-refiner"))
    assert table_curves(profiled) == table_curves(plain)  # the compare report's curves
    for metric in ("knn", "linear"):
        assert validation_curve(profiled, metric=metric) == validation_curve(plain, metric=metric)


def test_a_raw_store_is_refused_before_anything_is_written(tmp_path):
    raw = extract("test_vit", "synthetic:classes=3,train=10,test=5,size=16", out=tmp_path / "stores", img_size=32,
                  pool=("cls", "mean"), progress=False).store
    assert raw.manifest["norm"] == "raw"
    out = tmp_path / "profile"
    fix = "extract with `mimprobe extract MODEL DATA --norm final --pool cls,mean`"
    with pytest.raises(BadInputError, match=f"has norm raw: {fix}"):
        run_profile(raw.path, out=out, config=ProfileConfig(readout="last4+avg"), progress=False)
    assert not out.exists()
    # a model name: refused from the extraction's options, before the model, the data or the store is touched
    with pytest.raises(BadInputError, match="--norm final"):
        run_profile("test_vit", "synthetic:classes=3,train=10,test=5,size=16", out=out,
                    config=ProfileConfig(readout="last1"), progress=False)
    assert not out.exists()
    result = runner.invoke(app, ["profile", str(raw.path), "--out", str(out), "--readout", "last4", "--no-progress"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--norm final" in lines[0], result.output
    assert not out.exists()
    # `all` needs neither the final norm nor a given pooling
    table = profile_store(raw, ProfileConfig(metrics=("linear",), readout="all"), progress=False)
    assert set(table[table["metric"] == "linear_readout_top1"]["pooling"]) == {"cls", "mean"}


def test_the_console_lists_the_readouts_beside_the_best_single_block(final_store, tmp_path):
    result = runner.invoke(app, ["profile", str(final_store.path), "--out", str(tmp_path), "--metrics", "linear",
                                 "--readout", "last4+avg,all", "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "profile.csv")
    value = readout_row(table, "last4+avg")["value"]
    lines = result.stdout.split("multi-block readouts (linear probe top-1, --readout):\n")[1].splitlines()
    assert lines[0].split() == ["DINOv2", "last4+avg", "blocks", "2-5", "(cls+mean)", f"{100 * value:.1f}", "%",
                                *lines[0].split()[7:]]
    best = table[(table["metric"] == "linear_top1") & (table["pooling"] == "cls")]["value"].max()
    assert lines[0].endswith(f"{100 * best:.1f} %)") and "best single block" in lines[0]
    assert [line.split()[:3] for line in lines[1:3]] == [["all", "blocks", "(cls)"], ["all", "blocks", "(mean)"]]


def test_bad_readout_settings_are_refused(final_store, tmp_path):
    only_cls = extract("test_vit", "synthetic:classes=3,train=10,test=5,size=16", out=tmp_path, img_size=32,
                       norm="final", blocks=[4, 5], progress=False).store
    fix = "extract with `mimprobe extract MODEL DATA --norm final --pool cls,mean`"
    with pytest.raises(BadInputError, match=f"has no mean pooling: {fix}"):
        profile_store(only_cls, ProfileConfig(readout="last1+avg"), progress=False)
    with pytest.raises(BadInputError, match="lacks block 2: extract with --blocks all"):
        profile_store(only_cls, ProfileConfig(readout="last4"), progress=False)
    with pytest.raises(BadInputError, match="unknown --readout value 'last3'"):
        ProfileConfig(readout="last3")
    with pytest.raises(BadInputError, match="add linear to --metrics"):
        ProfileConfig(metrics=("knn",), readout="all")
    # all is 6 x 64 = 384 wide: its solver's 384 x 384 matrices (5.9 MB) do not fit a 1 MB budget
    with pytest.raises(BadInputError, match=r"all \(cls\) is 6 x 64 = 384 features wide.*raise --memory-budget"):
        profile_store(final_store, ProfileConfig(metrics=("linear",), readout="all", memory_budget=2 ** 20),
                      progress=False)
    assert parse_readouts("none") == () and parse_readouts("last4, all,last4") == ("last4", "all")


def test_concatenated_rows_read_as_the_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(50, width)).astype(np.float16) for width in (3, 5)]
    maps = []
    for i, array in enumerate(arrays):
        path = tmp_path / f"{i}.npy"
        np.save(path, array)
        maps.append(np.load(path, mmap_mode="r"))
    rows = np.array([1, 4, 9, 10, 30, 49])
    whole = np.concatenate(arrays, axis=1)
    view = ConcatenatedRows([maps[0], RowSubset(maps[1], np.arange(50))])
    assert view.shape == (50, 8) and len(view) == 50 and view.dtype == np.float16
    np.testing.assert_array_equal(view[10:20], whole[10:20])
    np.testing.assert_array_equal(view[rows], whole[rows])
    np.testing.assert_array_equal(np.asarray(view, dtype=np.float32), whole.astype(np.float32))
    subset = ConcatenatedRows([RowSubset(m, rows) for m in maps])
    np.testing.assert_array_equal(subset[[0, 2, 5]], whole[rows[[0, 2, 5]]])
    with pytest.raises(BadInputError, match="one number of rows"):
        ConcatenatedRows([maps[0], maps[1][:10]])


@pytest.mark.slow
def test_readouts_match_sklearn_on_real_cifar_images(tmp_path):
    """Real images (CIFAR-10, 300 train and 100 test per class): DINOv2's readouts against scikit-learn."""
    images = unpack_cifar(tmp_path / "cifar10", train=300, test=100)
    store = extract("test_vit", images, out=tmp_path / "stores", img_size=32, pool=("cls", "mean"), norm="final",
                    store_dtype="float32", model_kwargs=REGISTERS, batch_size=250, progress=False).store
    table = profile_store(store, ProfileConfig(metrics=("linear",), readout="last1,last4,last1+avg,last4+avg"),
                          progress=False)
    references = hand_built_references(store, str(images), DINOV2_READOUTS)
    for name, reference in references.items():
        assert readout_row(table, name)["value"] == pytest.approx(reference, abs=0.01), name  # 1 point: 10 images
