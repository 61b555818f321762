"""`run_compare` end to end on real profiles: the report's numbers are the profiles', intervals, CKA, placement,
relative depth, the merged table and self-containment of the HTML."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from mimprobe.report import CompareConfig, linear_cka, run_compare

CONFIG = CompareConfig(resamples=400)


@pytest.fixture(scope="module")
def report(profiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return run_compare([profiles.before, profiles.after], out=out, labels=["base", "refined"], config=CONFIG)


def _curve(folder, metric: str, split: str, pooling: str) -> pd.Series:
    table = pd.read_parquet(folder / "profile.parquet")
    rows = table[(table["metric"] == metric) & (table["split"] == split) & (table["pooling"] == pooling)]
    return rows.set_index("block")["value"].sort_index()


def _table(tables: dict, table_id: str) -> pd.DataFrame:
    header, *rows = tables[table_id]
    return pd.DataFrame(rows, columns=header)


def test_report_tables_hold_the_profiles_numbers(report, profiles, read_tables):
    tables = read_tables((report.out / "report.html").read_text())
    for metric, split, slug in (("knn_top1", "test", "knn_top1-test-k10"), ("linear_top1", "test", "linear_top1-test"),
                                ("knn_top1", "val", "knn_top1-val-k10")):
        for pooling in ("cls", "mean"):
            frame = _table(tables, f"deltas-0-{slug}-{pooling}")
            assert frame["block"].tolist() == [str(b) for b in range(6)]
            before, after = _curve(profiles.before, metric, split, pooling), _curve(profiles.after, metric, split,
                                                                                    pooling)
            assert frame["base (%)"].tolist() == [f"{100 * v:.1f}" for v in before]
            assert frame["refined (%)"].tolist() == [f"{100 * v:.1f}" for v in after]
            assert frame["difference"].tolist() == [f"{100 * (a - b):+.1f}" for a, b in zip(after, before)]
            for text, delta in zip(frame["95 % CI"], after - before):
                low, high = (float(x) for x in re.fullmatch(r"\[(\S+), (\S+)\]", text).groups())
                assert low - 0.05 <= 100 * delta <= high + 0.05  # the observed difference lies in its interval
    best = _table(tables, "best-0")
    knn = best[(best["metric"] == "k-NN top-1 (mim-refiner, k=10, T=0.07), test") & (best["pooling"] == "cls")]
    before = _curve(profiles.before, "knn_top1", "test", "cls")
    after = _curve(profiles.after, "knn_top1", "test", "cls")
    assert knn["base: block, value"].item() == f"{before.idxmax()}: {100 * before.max():.1f}%"
    assert knn["refined: block, value"].item() == f"{after.idxmax()}: {100 * after.max():.1f}%"
    assert knn["difference [95 % CI]"].item().startswith(f"{100 * (after.max() - before.max()):+.1f} [")


def test_markdown_has_the_same_tables(report):
    markdown = (report.out / "report.md").read_text()
    html = (report.out / "report.html").read_text()
    for heading in ("Block curves", "Best blocks", "Per-block differences", "Similarity of blocks (CKA)",
                    "Per-class gains", "Placement", "Configuration and software"):
        assert f"## {heading}" in markdown and f">{heading}</h2>" in html.replace("&amp;", "&")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert images and all((report.out / name).is_file() and name.endswith(".png") for name in images)
    assert len(images) == html.count("<img ")


def test_intervals_come_from_the_saved_predictions(report):
    pair = report.pairs[0]
    assert pair.interval_sources["k-NN top-1 (mim-refiner, k=10, T=0.07), test"] == "predictions.npz"
    assert pair.interval_sources["linear probe top-1, test"] == "predictions.npz"
    rows = pair.deltas[[key.has_samples for key in pair.deltas["key"]]]
    assert rows["low"].notna().all() and (rows["low"] <= rows["delta"] + 1e-12).all()
    others = pair.deltas[[not key.has_samples for key in pair.deltas["key"]]]
    assert others.empty or others["low"].isna().all()


def test_cka_heatmap_from_the_two_stores(report, profiles):
    from mimprobe.features import FeatureStore

    pair = report.pairs[0]
    assert pair.cka is not None and pair.cka.values.shape == (6, 6) and pair.cka.pooling == "cls"
    before, after = pair.before.store, pair.after.store
    i, j = 2, 5
    expected = linear_cka(np.asarray(before.features("test", i, "cls"), np.float64),
                          np.asarray(after.features("test", j, "cls"), np.float64))
    assert pair.cka.values[i, j] == pytest.approx(expected, abs=1e-5)
    saved = pd.read_csv(report.out / "cka_0.csv", index_col=0)
    assert saved.shape == (6, 6) and saved.iloc[i, j] == pytest.approx(pair.cka.values[i, j])
    assert isinstance(before, FeatureStore) and (report.out / "cka_0.png").is_file()


def test_placement_found_beside_the_checkpoint(report, profiles):
    pair = report.pairs[0]
    placement = json.loads((profiles.run / "placement.json").read_text())
    assert pair.placement is not None and list(pair.placement.head_blocks) == placement["head_blocks"] == [3, 4, 5]
    assert pair.placement_source == str(profiles.run / "placement.json")
    html = (report.out / "report.html").read_text()
    assert "refinement heads were on blocks 3, 4, 5" in html


def test_per_class_gains_are_the_class_rows_of_the_best_blocks(report, profiles, read_tables):
    pair = report.pairs[0]
    gains = pair.class_gains.set_index("class")
    tables = [pd.read_parquet(folder / "profile.parquet") for folder in (profiles.before, profiles.after)]
    for table, block, column in zip(tables, (gains["before_block"].iloc[0], gains["after_block"].iloc[0]),
                                    ("before", "after")):
        rows = table[(table["metric"] == "knn_class_top1") & (table["split"] == "test") & (table["pooling"] == "cls")
                     & (table["block"] == block)]
        for params, value in zip(rows["params"], rows["value"]):
            assert gains.loc[json.loads(params)["class"], column] == value
    shown = _table(read_tables((report.out / "report.html").read_text()), "class-gains-0")
    assert len(shown) == 4
    for row in shown.itertuples(index=False):
        assert row[3] == f"{100 * gains.loc[row[0], 'gain']:+.1f}"


def test_merged_table_has_both_sides_and_exact_delta_rows(report, profiles):
    table = pd.read_parquet(report.out / "compare.parquet")
    assert set(table["side"]) == {"before", "after", "delta"} and set(table["label"]) == {"base", "refined",
                                                                                         "refined - base"}
    assert pd.read_csv(report.out / "compare.csv").shape == table.shape
    before = table[(table["side"] == "before") & (table["metric"] == "knn_top1") & (table["split"] == "test")]
    assert len(before) == len(pd.read_parquet(profiles.before / "profile.parquet").query(
        "metric == 'knn_top1' and split == 'test'"))
    delta = table[(table["side"] == "delta") & (table["metric"] == "knn_top1") & (table["split"] == "test")
                  & (table["pooling"] == "mean")].set_index("block")["value"]
    expected = _curve(profiles.after, "knn_top1", "test", "mean") - _curve(profiles.before, "knn_top1", "test", "mean")
    np.testing.assert_array_equal(delta.sort_index().to_numpy(), expected.to_numpy())


def test_html_is_self_contained(report):
    html = (report.out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "@import" not in html and not re.search(r"url\(\s*['\"]?https?:", html)
    images = re.findall(r"<img\b[^>]*>", html)
    assert len(images) >= 10
    assert all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', tag) for tag in images)
    assert '<meta name="viewport"' in html and "max-width" in html and "overflow-x: auto" in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)) and all(f'id="{target}"' in html for target in re.findall(r'href="#([^"]+)"', html))


def test_different_depths_are_compared_by_relative_depth(profiles, tmp_path, read_tables):
    result = run_compare([profiles.before, profiles.deeper], out=tmp_path, config=CONFIG)
    pair = result.pairs[0]
    assert pair.relative_depth and pair.deltas.empty and pair.poolings == ["mean"]
    assert pair.cka.values.shape == (6, 8) and pair.cka.pooling == "mean"  # test_vit2 has no CLS token
    html = (tmp_path / "report.html").read_text()
    assert "compared by relative depth" in html and "Per-block differences" not in html
    best = _table(read_tables(html), "best-0")
    deeper = _curve(profiles.deeper, "knn_top1", "test", "mean")
    row = best[(best["metric"].str.startswith("k-NN top-1")) & (best["metric"].str.endswith("test"))
               & (best["pooling"] == "mean")]
    assert row["deeper: block, value"].item().startswith(f"{deeper.idxmax()}: ")
    # same images: best against best has an interval
    assert re.fullmatch(r"\S+ \[\S+, \S+\]", row["difference [95 % CI]"].item())
    table = pd.read_parquet(tmp_path / "compare.parquet")
    last = table[(table["label"] == "deeper") & (table["block"] == 7)]
    assert (last["relative_depth"] == 1.0).all()


def test_summary_counts_intervals_excluding_zero_and_names_random_init(report, profiles):
    from mimprobe.report.content import summary_lines

    pair = report.pairs[0]
    rows = pair.deltas[pair.deltas["low"].notna()]
    excluded = int(((rows["low"] > 0) | (rows["high"] < 0)).sum())
    lines = summary_lines(report.pairs, CONFIG)
    count = next(line for line in lines if "per-block 95 % intervals exclude 0" in line)
    assert count.startswith(f"{excluded} of the {len(rows)} per-block")
    assert f"about {0.05 * len(rows):.1f} (5 %) would by chance" in count
    # the base profile is test_vit with seeded random weights; the refined one loads a checkpoint
    assert any(line.startswith("base: random initialisation") for line in lines)
    assert not any(line.startswith("refined: random initialisation") for line in lines)
    html = (report.out / "report.html").read_text()
    assert "random initialisation" in html and "per-block 95 % intervals exclude 0" in html


def test_curve_bands_are_wilson_intervals_of_the_predictions(report, profiles):
    from mimprobe.metrics.intervals import wilson_interval
    from mimprobe.report.content import curve_band
    from mimprobe.metrics.curves import Curve

    after = report.profiles[1]
    key = next(k for k in report.pairs[0].keys if k.metric == "knn_top1" and k.split == "test")
    low, high, what = curve_band(after, key, "cls")
    assert what == "95 % Wilson interval" and list(low.index) == list(range(6))
    table = after.table
    for block in range(6):
        row = table[(table["metric"] == "knn_top1") & (table["split"] == "test") & (table["pooling"] == "cls")
                    & (table["block"] == block)].iloc[0]
        hits = after.predictions.get(metric="knn_top1", split="test", block=block, pooling="cls",
                                     params=row["params"])
        expected = wilson_interval(hits.sum(), len(hits))
        assert (low[block], high[block]) == pytest.approx(tuple(map(float, expected)))
        assert low[block] <= row["value"] <= high[block]
    assert curve_band(after, Curve("rankme", "train"), "cls") is None


def test_summary_names_the_blocks_not_distinguishable_from_the_best(report):
    from mimprobe.metrics.headlines import headline_curve, indistinguishable_blocks
    from mimprobe.report.content import summary_lines

    pair = report.pairs[0]
    row = pair.best[(pair.best["key"] == pair.headline) & (pair.best["pooling"] == pair.class_pooling)].iloc[0]
    key = pair.headline
    curve = headline_curve(pair.before.table, key, "cls",
                           predictions=pair.before.predictions)
    expected = indistinguishable_blocks(curve, int(row["before_block"]))
    lines = summary_lines(report.pairs, CONFIG)
    tied = [line for line in lines if line.startswith("blocks not distinguishable from the best")]
    if len(expected) > 1:  # 32 test images: most blocks tie
        assert f"base {', '.join(map(str, expected))}" in tied[0]
    else:
        assert not tied or "base" not in tied[0]
