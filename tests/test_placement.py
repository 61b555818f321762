"""Head placement: the peak-plateau rule on known curves, spacing, last-n, explicit, freezing, the validation-only
signal, bad input, placement.json round trips, and `mimprobe place` on a real profile."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mimprobe.cli import app
from mimprobe.errors import BadInputError
from mimprobe.placement import Placement, load_placement, place, run_place, validation_curve
from mimprobe.placement.rules import DEFAULT_PLATEAU

runner = CliRunner()
KNN = {"T": 0.07, "k": 10, "preset": "mim-refiner", "standardize": True, "weighting": "exp"}
# rises to block 7, stays within half a point of the peak (block 8) on 7-9, falls afterwards
PLATEAU_CURVE = [0.30, 0.40, 0.50, 0.60, 0.70, 0.78, 0.85, 0.900, 0.903, 0.899, 0.88, 0.86]


def rows(values, *, metric="knn_top1", split="val", pooling="cls", params=None, model="vit_test"):
    params = KNN if params is None and metric.startswith("knn") else (params or {})
    return [{"model": model, "checkpoint": "random", "dataset": "synthetic", "split": split, "block": block,
             "pooling": pooling, "metric": metric, "params": json.dumps(params, sort_keys=True, separators=(",", ":")),
             "value": float(value), "seed": None} for block, value in enumerate(values)]


def table(*groups):
    return pd.DataFrame.from_records([row for group in groups for row in group])


def tent(num_blocks, peak, low=0.3, high=0.9):
    """A curve rising linearly to ``peak`` and falling linearly after it (no plateau)."""
    up = np.linspace(low, high, peak + 1)
    down = np.linspace(high, low, num_blocks - peak)[1:]
    return [*up, *down]


# ---------------------------------------------------------------------------------------------- peak rule


def test_peak_rule_starts_heads_at_the_plateau_start():
    placement = place(table(rows(PLATEAU_CURVE)), num_blocks=12)
    assert placement.rule == "peak" and placement.peak_block == 8 and placement.peak_value == pytest.approx(0.903)
    assert placement.plateau_start == 7 and placement.head_blocks == (7, 8, 9, 10, 11)
    assert placement.freeze_blocks == 0 and placement.model == "vit_test"
    assert placement.inputs.split == "val" and placement.inputs.metric_name == "knn_top1"
    assert dict(placement.inputs.curve) == pytest.approx(dict(enumerate(PLATEAU_CURVE)))
    assert placement.reason == ("k-NN top-1 on the validation split (cls) peaks at block 8 (90.3 %); the plateau "
                                "within 0.5 points starts at block 7, so heads go on every block from 7 to 11 "
                                "(5 heads).")


def test_plateau_is_contiguous_and_its_tolerance_is_inclusive():
    early_spike = list(PLATEAU_CURVE)
    early_spike[2] = 0.902  # within tolerance but cut off from the peak by the dip at blocks 3-6
    assert place(table(rows(early_spike)), num_blocks=12).plateau_start == 7
    boundary = list(PLATEAU_CURVE)
    boundary[6] = 0.903 - DEFAULT_PLATEAU  # exactly peak - tolerance belongs to the plateau
    assert place(table(rows(boundary)), num_blocks=12).plateau_start == 6
    assert place(table(rows(PLATEAU_CURVE)), num_blocks=12, plateau=0.0).head_blocks == (8, 9, 10, 11)
    assert place(table(rows(PLATEAU_CURVE)), num_blocks=12, plateau=0.06).plateau_start == 6


def test_a_plateau_from_the_first_block_puts_a_head_on_every_block():
    """A model whose curve is flat within the tolerance from block 0 (the features are as good from the start):
    the plateau starts at block 0 and every block gets a head; the walk must reach block 0."""
    flat = [0.898, 0.899, 0.900, 0.903, 0.901, 0.900]
    placement = place(table(rows(flat)), num_blocks=6)
    assert placement.plateau_start == 0 and placement.head_blocks == (0, 1, 2, 3, 4, 5)
    assert "starts at block 0" in placement.reason
    # block 1 starts it when block 0 is below the tolerance
    assert place(table(rows([0.5, *flat[1:]])), num_blocks=6).plateau_start == 1


def test_the_plateau_follows_the_standard_error_of_the_validation_split():
    """Without --plateau the tolerance is 1.96 sqrt(2) binomial standard errors at the peak on the validation
    images; --plateau overrides it; without the split size the fixed default applies, with a note."""
    se = np.sqrt(0.903 * 0.097 / 5000)
    placement = place(table(rows(PLATEAU_CURVE)), num_blocks=12, val_images=5000)
    assert placement.inputs.plateau == pytest.approx(1.959963984540054 * np.sqrt(2) * se)
    assert placement.inputs.plateau_from == "standard error" and placement.inputs.val_images == 5000
    assert placement.head_blocks == (7, 8, 9, 10, 11)  # a clear peak: as with the fixed half point
    assert "1.96 sqrt(2) standard errors on 5,000 images" in placement.reason
    assert not any(note.startswith("warning") for note in placement.notes)
    # 500 images: SE 1.3 points, tolerance 3.7 points: block 6 (0.85, 5.3 below) stays out, nothing is flat
    wide = place(table(rows(PLATEAU_CURVE)), num_blocks=12, val_images=500)
    assert wide.plateau_start == 7 and any("500 images" in note and "warning" in note for note in wide.notes)
    fixed = place(table(rows(PLATEAU_CURVE)), num_blocks=12, val_images=50, plateau=0.0)
    assert fixed.head_blocks == (8, 9, 10, 11) and fixed.inputs.plateau_from == "fixed"
    unknown = place(table(rows(PLATEAU_CURVE)), num_blocks=12)
    assert unknown.inputs.plateau == DEFAULT_PLATEAU and any("size of the validation split is unknown" in note
                                                             for note in unknown.notes)
    assert Placement.from_dict(json.loads(json.dumps(placement.to_dict()))) == placement


@pytest.mark.parametrize("seed", range(5))
def test_a_flat_noisy_curve_places_few_heads_and_warns(seed):
    """The issue's case: 200 validation images (one image = half a point), a curve that does not change with depth
    beyond binomial noise. The fixed half-point plateau lets noise decide; the standard-error plateau sees that no
    block differs from the peak, warns, and puts heads on the last third of the blocks only."""
    rng = np.random.default_rng(seed)
    noisy = rng.binomial(200, 0.62, size=12) / 200
    placement = place(table(rows(noisy)), num_blocks=12, val_images=200)
    assert placement.head_blocks == (8, 9, 10, 11)
    warnings = [note for note in placement.notes if note.startswith("warning: ")]
    assert any("200 images" in note for note in warnings)
    assert any("does not vary with depth beyond its binomial noise" in note for note in warnings)
    assert "the last third (flat curve) gets the heads" in placement.reason
    # --max-heads still caps the count, spaced over the last third
    assert place(table(rows(noisy)), num_blocks=12, val_images=200, max_heads=3).head_blocks == (8, 10, 11)
    # the same noisy curve on 20,000 images would be a real curve: no flat-curve fallback
    assert not any("binomial noise" in note for note in place(table(rows(noisy)), num_blocks=12,
                                                               val_images=20000).notes)


def test_a_varying_curve_whose_plateau_reaches_the_first_block_is_not_called_flat():
    """The demo's case: 135 validation images, a curve that peaks at block 2 and falls by the last block
    (it varies with depth: homogeneity p << 0.05), with block 0 within the tolerance of the peak. The fallback to
    the last third stays, but the warning must not say the curve does not vary."""
    curve = [0.78, 0.82, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.56, 0.52, 0.48, 0.45]
    placement = place(table(rows(curve)), num_blocks=12, val_images=135)
    warnings = [note for note in placement.notes if note.startswith("warning: ")]
    assert placement.head_blocks == (8, 9, 10, 11)
    assert not any("does not vary with depth" in note for note in warnings)
    assert any("varies with depth (homogeneity test p = " in note and "every block from the first lies within"
               in note for note in warnings)
    assert "the noise cannot locate the plateau's start" in placement.reason


def test_a_clear_peak_on_a_small_split_places_as_before():
    """A tent with 6-point steps: even on 200 images (tolerance about 8 points at 90 %) the peak is clear."""
    curve = tent(12, 8)
    before = place(table(rows(curve)), num_blocks=12, plateau=DEFAULT_PLATEAU)
    after = place(table(rows(curve)), num_blocks=12, val_images=200)
    assert "flat curve" not in after.reason and "flat curve" not in before.reason
    assert after.head_blocks == before.head_blocks == (8, 9, 10, 11)
    assert not any("binomial noise" in note for note in after.notes)


def test_head_size_note_matches_the_refine_heads(tmp_path):
    """The torch-free parameter count equals the real heads' at both widths, the note's sizes equal what refine
    itself expects (`sizing.checkpoint_bytes` on the real modules), and 12 official heads on a ViT-Tiny (the
    issue's 1.15 GB checkpoint) are flagged with the proportional widths' size beside them."""
    import timm
    from torch import nn

    from mimprobe.placement.run import head_size_note
    from mimprobe.head_widths import OFFICIAL_HEAD_DIMS, head_parameters, proportional_head_dims
    from mimprobe.refinement.heads import HeadConfig, NNAHead
    from mimprobe.refinement.sizing import checkpoint_bytes

    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    encoder_params = sum(p.numel() for p in encoder.parameters())
    for dims in (OFFICIAL_HEAD_DIMS, proportional_head_dims(192)):
        head = NNAHead(192, HeadConfig(hidden_dim=dims[0], proj_dim=dims[1], predictor_hidden_dim=dims[2]))
        assert head_parameters(192, dims) == sum(p.numel() for p in head.parameters())
    heads = nn.ModuleList(NNAHead(192, HeadConfig(hidden_dim=d[0], proj_dim=d[1], predictor_hidden_dim=d[2]))
                          for d in [proportional_head_dims(192)] * 12)
    expected = checkpoint_bytes(encoder, heads, nn.Module(), trained_encoder_params=encoder_params,
                                full_stage=True)["checkpoint"]
    note = head_size_note(12, {"embed_dim": 192, "num_params": encoder_params})
    assert note.startswith("warning: 12 heads of the official widths (2048/256/4096") and "1.1 GiB" in note
    assert f"(384/48/768, refine's default on a CPU below 224 px, or --head-dims proportional) about " \
           f"{expected / 1024 ** 3:.2f} GiB" in note
    assert head_size_note(4, {"embed_dim": 192, "num_params": encoder_params}) is None


def test_ties_take_the_first_peak():
    curve = [0.5, 0.9, 0.5, 0.5, 0.9, 0.5]
    assert place(table(rows(curve)), num_blocks=6, plateau=0.0).head_blocks == (1, 2, 3, 4, 5)


@pytest.mark.parametrize(("num_blocks", "peak", "heads"), [(24, 16, range(16, 24)), (32, 20, range(20, 32))])
def test_mim_refiner_head_counts(num_blocks, peak, heads):
    """ViT-L: 8 heads on blocks 17-24 of 24; ViT-H: 12 heads on blocks 21-32 of 32 (1-based, arXiv 2402.10093)."""
    placement = place(table(rows(tent(num_blocks, peak))), num_blocks=num_blocks)
    assert placement.head_blocks == tuple(heads)


def test_max_heads_are_spaced_evenly_with_both_ends():
    curve = tent(24, 4)
    placement = place(table(rows(curve)), num_blocks=24, max_heads=5)
    assert placement.head_blocks == (4, 9, 14, 18, 23)  # linspace(4, 23, 5) = 4, 8.75, 13.5, 18.25, 23 rounded
    assert "5 heads are spaced evenly over blocks 4-23, the last block included" in placement.reason
    assert place(table(rows(curve)), num_blocks=24, max_heads=1).head_blocks == (23,)
    assert place(table(rows(curve)), num_blocks=24, max_heads=2).head_blocks == (4, 23)
    assert place(table(rows(curve)), num_blocks=24, max_heads=20).head_blocks == tuple(range(4, 24))
    assert place(table(rows(curve)), num_blocks=24, max_heads=50).head_blocks == tuple(range(4, 24))


@pytest.mark.parametrize("num_blocks", [6, 12, 24])
def test_spacing_properties_for_every_start_and_count(num_blocks):
    for peak in range(num_blocks):
        curve = table(rows(tent(num_blocks, peak) if 0 < peak < num_blocks - 1 else
                           np.linspace(0.9, 0.3, num_blocks) if peak == 0 else np.linspace(0.3, 0.9, num_blocks)))
        count = num_blocks - peak
        for max_heads in range(1, count + 2):
            heads = place(curve, num_blocks=num_blocks, max_heads=max_heads).head_blocks
            assert len(heads) == min(max_heads, count) and list(heads) == sorted(set(heads))
            assert heads[-1] == num_blocks - 1 and (max_heads == 1 or heads[0] == peak)
            gaps = np.diff(heads)
            assert len(gaps) == 0 or gaps.max() - gaps.min() <= 1, (peak, max_heads, heads)


def test_the_rule_reads_only_the_validation_split():
    val = rows(PLATEAU_CURVE)
    poisoned_test = rows(tent(12, 2, high=0.99), split="test")  # a different, higher peak on test
    clean = place(table(val), num_blocks=12)
    poisoned = place(table(val, poisoned_test), num_blocks=12)
    assert poisoned.to_dict() == clean.to_dict() and poisoned.head_blocks == (7, 8, 9, 10, 11)
    with pytest.raises(BadInputError, match=r"knn_top1 only on test, never used for placement"):
        place(table(poisoned_test), num_blocks=12)


def test_linear_metric_reads_linear_val_top1_not_linear_top1():
    linear_val = rows(PLATEAU_CURVE, metric="linear_val_top1", params={"lr": 10.0})
    linear_test = rows(tent(12, 1), metric="linear_top1", split="test", params={"lr": 10.0})
    knn = rows(tent(12, 3))
    placement = place(table(linear_val, linear_test, knn), num_blocks=12, metric="linear")
    assert placement.head_blocks == (7, 8, 9, 10, 11) and placement.inputs.metric_name == "linear_val_top1"
    assert placement.reason.startswith("linear-probe top-1 on the validation split (cls) peaks at block 8")
    assert place(table(linear_val, linear_test, knn), num_blocks=12).head_blocks == tuple(range(3, 12))


def test_train_loo_is_the_fallback_validation_signal():
    loo = rows(PLATEAU_CURVE, split="train-loo")
    placement = place(table(loo, rows(tent(12, 1), split="train-holdout")), num_blocks=12)
    assert placement.head_blocks == (7, 8, 9, 10, 11) and placement.inputs.split == "train-loo"
    assert "leave-one-out (the profile has no validation split)" in placement.reason
    assert any("train-loo" in note for note in placement.notes)
    # with both, val wins
    assert place(table(loo, rows(tent(12, 2))), num_blocks=12).head_blocks == tuple(range(2, 12))


def test_several_knn_protocols_pick_one_and_say_which():
    groups = [rows(tent(12, peak), params={**KNN, "preset": "dinov2", "k": k, "weighting": "softmax"})
              for peak, k in ((5, 10), (2, 20), (9, 200))]
    placement = place(table(*groups), num_blocks=12)
    assert placement.head_blocks == tuple(range(5, 12)) and placement.inputs.params["k"] == 10
    assert "preset dinov2, k=10" in placement.notes[0]
    assert place(table(*groups), num_blocks=12, k=200).head_blocks == (9, 10, 11)
    with pytest.raises(BadInputError, match=r"preset dinov2, not mim-refiner"):
        place(table(*groups), num_blocks=12, preset="mim-refiner")
    seeds = table(rows([0.5, 0.9, 0.5]), rows([0.5, 0.5, 0.9]))  # repeated rows (seeds) are averaged
    assert validation_curve(seeds).values == ((0, 0.5), (1, 0.7), (2, 0.7))


# ------------------------------------------------------------------------------------- last-n, explicit, freeze


def test_last_n_and_explicit_blocks():
    profile = table(rows(PLATEAU_CURVE))
    last = place(profile, num_blocks=12, rule="last-n", n=4)
    assert last.head_blocks == (8, 9, 10, 11) and last.reason.startswith("rule last-n: heads on the last 4 blocks")
    assert last.peak_block == 8  # the curve is still recorded for the report
    assert place(profile, num_blocks=12, rule="last-n", n=12).head_blocks == tuple(range(12))
    explicit = place(None, num_blocks=12, rule="explicit", blocks=[-1, 5, -4, 11])
    assert explicit.head_blocks == (5, 8, 11) and explicit.inputs.blocks == (-1, 5, -4, 11)
    assert explicit.inputs.curve == () and explicit.peak_block is None
    no_curve = place(table(rows(PLATEAU_CURVE, metric="rankme", split="train")), num_blocks=12, rule="last-n", n=2)
    assert no_curve.head_blocks == (10, 11) and "no validation curve recorded" in no_curve.notes[0]


@pytest.mark.parametrize(("freeze", "num_blocks", "frozen"), [(None, 12, 0), (0, 12, 0), (6, 12, 6), (7, 12, 7),
                                                                (0.25, 12, 3), (0.25, 24, 6), (0.25, 40, 10),
                                                                (0.5, 13, 7)])
def test_freeze_counts(freeze, num_blocks, frozen):
    placement = place(None, num_blocks=num_blocks, rule="last-n", n=num_blocks - 10, freeze=freeze)
    assert placement.head_blocks[0] == 10 and placement.freeze_blocks == frozen
    if frozen:
        assert f"the first {frozen} blocks (0-{frozen - 1}" in placement.reason


# ------------------------------------------------------------------------------------------------- bad input

BAD = {
    "unknown rule": (dict(rule="middle"), r"unknown placement rule 'middle': use peak, last-n, explicit"),
    "max_heads 0": (dict(max_heads=0), r"--max-heads must be a whole number of at least 1, got 0"),
    "negative plateau": (dict(plateau=-0.01), r"--plateau -0.01 must be an accuracy fraction in \[0, 1\)"),
    "plateau in points": (dict(plateau=5), r"--plateau 5 must be an accuracy fraction"),
    "n with peak": (dict(n=3), r"--n belongs to rule last-n, not peak"),
    "blocks with peak": (dict(blocks=[1]), r"--blocks belongs to rule explicit, not peak"),
    "max_heads with last-n": (dict(rule="last-n", n=2, max_heads=2), r"--max-heads belongs to rule peak"),
    "last-n without n": (dict(rule="last-n"), r"rule last-n needs --n"),
    "n 0": (dict(rule="last-n", n=0), r"cannot take the last 0 blocks: the model has 12 blocks; use 1\.\.12"),
    "n too large": (dict(rule="last-n", n=13), r"cannot take the last 13 blocks: the model has 12 blocks"),
    "explicit without blocks": (dict(rule="explicit"), r"rule explicit needs --blocks"),
    "block out of range": (dict(rule="explicit", blocks=[8, 12]),
                           r"unknown block index 12: the model has 12 blocks, numbered 0\.\.11"),
    "negative block out of range": (dict(rule="explicit", blocks=[-13]), r"unknown block index -13"),
    "freeze past the first head": (dict(freeze=8), r"freeze 8 keeps blocks 0-7 frozen but block 7 has a head: "
                                                   r"freeze at most 7 blocks"),
    "freeze fraction past the head": (dict(freeze=0.75), r"keeps blocks 0-8 frozen but block 7 has a head"),
    "freeze too large": (dict(freeze=12), r"--freeze 12 is out of range: the model has 12 blocks"),
    "freeze negative": (dict(freeze=-1), r"--freeze -1 is out of range"),
    "freeze fraction 1": (dict(freeze=1.0), r"--freeze 1 is out of range: give a fraction in \(0, 1\)"),
    "freeze bool": (dict(freeze=True), r"--freeze must be a number of blocks or a fraction"),
    "unknown metric": (dict(metric="cluster"), r"unknown placement metric 'cluster': use knn or linear"),
    "missing pooling": (dict(pooling="mean"), r"no knn_top1 for pooling 'mean' \(it has cls\): use --pooling"),
    "model of another depth": (dict(num_blocks=6), r"the profile has block 11 but the model has 6 blocks"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_says_what_to_do(case):
    options, pattern = BAD[case]
    options = {"num_blocks": 12, **options}
    with pytest.raises(BadInputError, match=pattern) as error:
        place(table(rows(PLATEAU_CURVE)), **options)
    assert "\n" not in str(error.value)


def test_missing_metric_names_the_metrics_present_and_the_fix():
    linear_only = table(rows(PLATEAU_CURVE, metric="linear_val_top1", params={}), rows(PLATEAU_CURVE, metric="rankme",
                                                                                         split="train"))
    with pytest.raises(BadInputError) as error:
        place(linear_only, num_blocks=12)
    message = str(error.value)
    assert "no knn_top1 rows (it has linear_val_top1, rankme)" in message
    assert "use --metric linear, or re-run `mimprobe profile` with --metrics knn" in message
    with pytest.raises(BadInputError, match=r"no linear_val_top1 rows .* re-run `mimprobe profile` with --metrics "
                                            r"linear"):
        place(table(rows(PLATEAU_CURVE, metric="rankme", split="train")), num_blocks=12, metric="linear")
    with pytest.raises(BadInputError, match=r"rule peak needs a profile table"):
        place(None, num_blocks=12)
    with pytest.raises(BadInputError, match=r"not a profile table: columns params, value are missing"):
        place(pd.DataFrame({"split": [], "block": [], "pooling": [], "metric": []}), num_blocks=12)


# ------------------------------------------------------------------------------------------- placement.json


def test_dict_round_trip_and_validation(tmp_path):
    placement = place(table(rows(PLATEAU_CURVE)), num_blocks=12, max_heads=3, freeze=0.25, source="somewhere")
    payload = json.loads(json.dumps(placement.to_dict()))
    assert Placement.from_dict(payload) == placement and payload["format_version"] == 1
    assert payload["head_blocks"] == [7, 9, 11] and payload["inputs"]["freeze"] == 0.25
    path = tmp_path / "placement.json"
    broken = {"missing key": {k: v for k, v in payload.items() if k != "head_blocks"},
              "unknown key": {**payload, "heads": [1]},
              "newer format": {**payload, "format_version": 2},
              "block out of range": {**payload, "head_blocks": [7, 12]},
              "unsorted": {**payload, "head_blocks": [9, 7]},
              "frozen head": {**payload, "freeze_blocks": 8},
              "bad type": {**payload, "num_blocks": "twelve"}}
    patterns = {"missing key": r"missing keys head_blocks", "unknown key": r"unknown keys heads",
                "newer format": r"placement format 2 is not 1", "block out of range": r"not sorted unique blocks of "
                r"0\.\.11", "unsorted": r"not sorted unique", "frozen head": r"freezes 8 blocks but block 7 has a head",
                "bad type": r"not a valid placement \(ValueError"}
    for case, content in broken.items():
        path.write_text(json.dumps(content))
        with pytest.raises(BadInputError, match=patterns[case]):
            load_placement(path)
    path.write_text("{not json")
    with pytest.raises(BadInputError, match=r"is not valid JSON"):
        load_placement(path)
    with pytest.raises(BadInputError, match=r"placement file .*nowhere\.json not found"):
        load_placement(tmp_path / "nowhere.json")


def test_run_place_reads_the_depth_and_writes_json(tmp_path):
    folder = tmp_path / "profile"
    folder.mkdir()
    late_blocks = [row for row in rows(PLATEAU_CURVE) if row["block"] >= 8]  # a profile of the last 4 blocks only
    table(late_blocks).to_csv(folder / "profile.csv", index=False)
    (folder / "profile.json").write_text(json.dumps({"config": {"preset": "mim-refiner"},
                                                     "model": {"structure": {"num_blocks": 12}}}))
    placement = run_place(folder)
    assert placement.num_blocks == 12 and placement.head_blocks == (8, 9, 10, 11)
    assert any("the profile starts at block 8" in note for note in placement.notes)
    assert load_placement(folder / "placement.json") == placement
    assert json.loads((folder / "placement.json").read_text())["versions"]["numpy"] == np.__version__
    (folder / "profile.json").unlink()
    bare = run_place(folder, out=tmp_path / "elsewhere" / "p.json", rule="last-n", n=2)
    assert bare.num_blocks == 12 and any("largest profiled block + 1" in note for note in bare.notes)
    assert load_placement(tmp_path / "elsewhere" / "p.json").head_blocks == (10, 11)
    with pytest.raises(BadInputError, match=r"holds no profile\.parquet or profile\.csv"):
        run_place(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def real_profile(tmp_path_factory):
    """A k-NN profile of a random-init 12-block ViT (vit_tiny at 32 px) on tiny synthetic data."""
    import mimprobe

    out = tmp_path_factory.mktemp("profile")
    mimprobe.profile("vit_tiny_patch16_224", "synthetic:classes=3,train=8,test=2,size=16", out=str(out),
                     metrics="knn", img_size=32, pool="cls", progress=False)
    return out


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_place_cli_on_a_real_profile(real_profile, tmp_path):
    result = runner.invoke(app, ["place", str(real_profile)])
    assert result.exit_code == 0, result.output
    written = load_placement(real_profile / "placement.json")
    table_ = pd.read_parquet(real_profile / "profile.parquet")
    val = table_[(table_["metric"] == "knn_top1") & (table_["split"] == "val")].set_index("block")["value"]
    assert written.num_blocks == 12 and written.head_blocks[-1] == 11
    assert written.peak_value == pytest.approx(val.max()) and written.peak_block == int(val.idxmax())
    assert f"heads on blocks {', '.join(map(str, written.head_blocks))}" in result.stdout
    assert written.reason in result.stdout and f"wrote {real_profile / 'placement.json'}" in result.stdout

    as_json = runner.invoke(app, ["place", str(real_profile), "--blocks", "8-10,-1", "--freeze", "0.25", "--json",
                                  "--out", str(tmp_path / "p.json")])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload == json.loads((tmp_path / "p.json").read_text())
    assert payload["rule"] == "explicit" and payload["head_blocks"] == [8, 9, 10, 11] and payload["freeze_blocks"] == 3
    last = runner.invoke(app, ["place", str(real_profile), "--blocks", "last:3", "--out", str(tmp_path)])
    assert last.exit_code == 0 and load_placement(tmp_path / "placement.json").head_blocks == (9, 10, 11)

    missing = _error_line(runner.invoke(app, ["place", str(tmp_path / "no-profile")]))
    assert re.search(r"profile folder .*no-profile not found", missing)
    too_deep = _error_line(runner.invoke(app, ["place", str(real_profile), "--blocks", "40"]))
    assert "unknown block index 40: the model has 12 blocks, numbered 0..11" in too_deep
    bad_freeze = _error_line(runner.invoke(app, ["place", str(real_profile), "--freeze", "half"]))
    assert "invalid --freeze 'half'" in bad_freeze
    assert "Examples" in runner.invoke(app, ["place", "--help"]).output


def test_place_cli_on_a_profile_without_knn(real_profile, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(real_profile, copy, ignore=shutil.ignore_patterns("features"))
    (copy / "profile.parquet").unlink()
    table_ = pd.read_csv(copy / "profile.csv")
    table_[table_["metric"] != "knn_top1"].to_csv(copy / "profile.csv", index=False)
    line = _error_line(runner.invoke(app, ["place", str(copy)]))
    assert "no knn_top1 rows" in line and "--metrics knn" in line


def test_flat_curve_pvalue_is_scipys_chi_square():
    from scipy.stats import chi2

    from mimprobe.placement.rules import flat_curve_pvalue

    values = np.array([0.60, 0.62, 0.65, 0.58, 0.61])
    mean = values.mean()
    statistic = ((values - mean) ** 2).sum() / (mean * (1 - mean) / 200)
    assert flat_curve_pvalue(values, 200) == pytest.approx(chi2.sf(statistic, 4))
    assert flat_curve_pvalue(values, 20000) < 1e-6 and flat_curve_pvalue([1.0, 1.0], 10) == 1.0


def test_place_cli_reads_the_validation_size_and_imports_no_torch(tmp_path):
    """`mimprobe place` only reads a table: it must not load torch or timm (26-35 s on a loaded machine), and it
    takes the validation split's size from predictions.npz for the standard-error plateau."""
    import subprocess
    import sys

    folder = tmp_path / "profile"
    folder.mkdir()
    noisy = np.random.default_rng(0).binomial(200, 0.62, size=12) / 200
    table(rows(noisy)).to_csv(folder / "profile.csv", index=False)
    (folder / "profile.json").write_text(json.dumps({"model": {"structure": {"num_blocks": 12, "embed_dim": 192,
                                                                              "num_params": 5_487_552}}}))
    np.savez(folder / "predictions.npz", format_version=np.array(1), rows__val=np.arange(200))
    code = ("import sys\nfrom mimprobe.cli import app\n"
            f"sys.argv = ['mimprobe', 'place', {str(folder)!r}, '--out', {str(tmp_path / 'peak.json')!r}]\n"
            "try:\n    app()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "print('IMPORTED', 'torch' in sys.modules, 'timm' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED False False" in result.stdout
    result = runner.invoke(app, ["place", str(folder)])
    assert result.exit_code == 0, result.output
    placement = load_placement(folder)
    assert placement.inputs.val_images == 200 and placement.head_blocks == (8, 9, 10, 11)
    assert "warning: the validation split holds 200 images" in result.stderr
    assert "does not vary with depth" in result.stderr
    twelve = runner.invoke(app, ["place", str(folder), "--plateau", "0.5"])
    assert twelve.exit_code == 0 and "warning: 12 heads of the official widths" in twelve.stderr


def test_warnings_are_printed_with_one_prefix(tmp_path):
    """A placement warning reads "warning: ..." everywhere it is printed (`mimprobe place`, the pipeline's place
    stage, the compare report), never "note: warning: ..."; other notes get "note: "."""
    from types import SimpleNamespace

    from mimprobe.pipeline.run import _place
    from mimprobe.placement import note_line
    from mimprobe.report.content import _placement_section

    assert note_line("warning: x") == "warning: x" and note_line("x") == "note: x"
    run_dir = tmp_path / "run"
    folder = run_dir / "profile-before"
    folder.mkdir(parents=True)
    noisy = np.random.default_rng(0).binomial(200, 0.62, size=12) / 200
    table(rows(noisy)).to_csv(folder / "profile.csv", index=False)
    (folder / "profile.json").write_text(json.dumps({"model": {"structure": {"num_blocks": 12}}}))
    np.savez(folder / "predictions.npz", format_version=np.array(1), rows__val=np.arange(200))
    said: list[str] = []
    (run_dir / "place").mkdir()
    _place(SimpleNamespace(options=lambda section: {}), run_dir, run_dir / "place", fresh=True,
           progress=False, say=said.append)
    placement = load_placement(run_dir / "place")
    warnings = [line for line in said if "warning:" in line]
    assert len(warnings) == 2 and all(line.startswith("warning: ") and line.count("warning:") == 1
                                      for line in warnings)
    assert not any("note: warning" in line for line in said)
    section = _placement_section(0, SimpleNamespace(placement=placement, placement_source="placement.json"), "")
    items = section.parts[0].items
    assert sum(item.startswith("warning: ") for item in items) == 2 and not any("note: warning" in i for i in items)
