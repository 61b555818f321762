"""`run_compare`'s inputs: profiles without predictions.npz (no intervals), the out-folder
guard, and bad input (missing folders, different data)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from mimprobe.errors import BadInputError
from mimprobe.report import CompareConfig, compare, load_profile, run_compare
from mimprobe.metrics.curves import Curve, protocol_params

CONFIG = CompareConfig(resamples=400)


def test_profile_without_predictions_gives_no_interval_and_says_why(profiles, tmp_path):
    """A profile without predictions.npz: no per-sample results, so no intervals (never numbers recomputed under
    another protocol), and a note names the curves and the fix."""
    copies = []
    for name, folder in (("base", profiles.before), ("refined", profiles.after)):
        target = tmp_path / name
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("features"))
        (target / "predictions.npz").unlink()
        copies.append(target)
    config = CompareConfig(resamples=400, cka=False)
    pair = compare(load_profile(copies[0]), load_profile(copies[1]), config=config)
    saved = compare(load_profile(profiles.before), load_profile(profiles.after), config=config)
    key = Curve("knn_top1", "test", protocol_params('{"k":10,"preset":"mim-refiner","standardize":true,'
                                                                '"T":0.07,"weighting":"exp"}'))
    assert key.title not in pair.interval_sources and saved.interval_sources[key.title] == "predictions.npz"
    mine = pair.deltas[pair.deltas["key"] == key].reset_index(drop=True)
    theirs = saved.deltas[saved.deltas["key"] == key].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[["block", "delta"]], theirs[["block", "delta"]])
    assert mine["low"].isna().all() and mine["high"].isna().all() and theirs["low"].notna().all()
    note = next(note for note in pair.notes if note.startswith("no per-sample results"))
    assert key.title in note and "re-run `mimprobe profile`" in note


def test_rerun_and_out_folder_guard(profiles, tmp_path):
    config = CompareConfig(resamples=50, cka=False)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="holds other files"):
        run_compare([profiles.before, profiles.deeper], out=out, config=config)
    run_compare([profiles.before, profiles.deeper], out=out, overwrite=True, config=config)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "report.html").is_file()
    with pytest.raises(BadInputError, match="holds a report of the same comparison: .*--overwrite"):
        run_compare([profiles.before, profiles.deeper], out=out, config=config)  # the same comparison again
    run_compare([profiles.before, profiles.deeper], out=out, overwrite=True, config=config)
    with pytest.raises(BadInputError, match="holds another comparison"):
        run_compare([profiles.before, profiles.after], out=out, config=config)
    with pytest.raises(BadInputError, match="holds other files"):
        run_compare([profiles.before, profiles.after], out=profiles.run, config=config)


def test_bad_inputs(profiles, tmp_path):
    with pytest.raises(BadInputError, match=r"profile folder .*nowhere not found: make one with `mimprobe profile"):
        run_compare([profiles.before, tmp_path / "nowhere"], out=tmp_path / "a")
    with pytest.raises(BadInputError, match="at least two"):
        run_compare([profiles.before], out=tmp_path / "b")
    other = tmp_path / "other-data"
    shutil.copytree(profiles.after, other, ignore=shutil.ignore_patterns("features"))
    meta = json.loads((other / "profile.json").read_text())
    meta["dataset"] = {**meta["dataset"], "name": "cifar10", "fingerprint": "0" * 64}
    (other / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="different data.*--allow-different-data"):
        run_compare([profiles.before, other], out=tmp_path / "c")
    pair = compare(load_profile(profiles.before), load_profile(other),
                   config=CompareConfig(resamples=50, allow_different_data=True))
    assert pair.cka is None and "different data" in pair.cka_note and pair.deltas["low"].isna().all()


def test_refine_run_settings_come_from_the_run_folder(profiles, tmp_path):
    """config.json (as `run_refine` writes it, from RefineConfig.to_dict) and the last log.csv row."""
    from dataclasses import replace

    from mimprobe.refinement.config import RefineConfig
    from mimprobe.report.inputs import find_refine_run

    run = tmp_path / "run"
    run.mkdir()
    config = RefineConfig(epochs_heads=2, epochs=3, batch_size=64, lr_heads=1e-4, lr=3e-4, head_blocks=(4, 5))
    (run / "config.json").write_text(json.dumps({"config": config.to_dict(), "total_steps": 50,
                                                 "model": {"name": "test_vit", "weights": "random"}}))
    (run / "log.csv").write_text("step,stage,epoch,loss,lr\n1,1,0,5.5,1e-5\n2,1,0,4.25,2e-5\n")
    after = load_profile(profiles.after)
    moved = replace(after, meta={**after.meta, "model": {**after.meta["model"],
                                                         "checkpoint": str(run / "refined.safetensors")}})
    found = find_refine_run(moved)
    assert (found.epochs_heads, found.epochs, found.batch_size, found.steps) == (2, 3, 64, 2)
    assert found.final_loss == 4.25 and found.base_weights == "random"
    text = found.describe()
    assert "2 heads-only + 3 full epochs" in text and "final loss 4.250" in text and "random initialisation" in text
    assert find_refine_run(after) is None  # the fixture's run folder holds no config.json


def test_cli_compare_into_an_existing_report_refuses_without_overwrite(profiles, tmp_path):
    """`mimprobe compare` into a folder holding a report: exit 2, one line naming --overwrite, no file touched."""
    from typer.testing import CliRunner

    from mimprobe.cli import app

    out = tmp_path / "report"
    arguments = ["compare", str(profiles.before), str(profiles.deeper), "--out", str(out), "--resamples", "20",
                 "--no-cka"]
    runner = CliRunner()
    assert runner.invoke(app, arguments).exit_code == 0
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.iterdir()}

    refused = runner.invoke(app, arguments)

    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(out) in lines[0]
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.iterdir()} == before
    assert runner.invoke(app, [*arguments, "--overwrite"]).exit_code == 0


def test_compare_warns_when_the_export_barely_moved_or_no_block_differs(profiles, tmp_path):
    """ema_progress 0.2 in the refine run folder's config.json: a warning naming the run; 0.8: none. A profile
    compared with itself: every paired interval holds 0, so "cannot be told apart on any block"."""
    from dataclasses import replace

    import pandas as pd

    from mimprobe.refinement.config import RefineConfig
    from mimprobe.report.comparison import CompareConfig, compare, no_block_differs

    before, after = load_profile(profiles.before), load_profile(profiles.after)
    run = tmp_path / "run"
    run.mkdir()
    moved = replace(after, meta={**after.meta, "model": {**after.meta["model"],
                                                         "checkpoint": str(run / "refined.safetensors")}})
    config = CompareConfig(resamples=50, cka=False)
    notes = {}
    for progress in (0.2, 0.8):
        (run / "config.json").write_text(json.dumps({"config": RefineConfig().to_dict(), "total_steps": 5,
                                                     "ema_progress": progress}))
        notes[progress] = [n for n in compare(before, moved, config=config).notes if "EMA" in n]
    assert len(notes[0.2]) == 1 and notes[0.2][0].startswith(f"warning: {after.label} comes from a refinement ({run})")
    assert "ema_progress 0.20 < 0.5" in notes[0.2][0] and notes[0.8] == []

    itself = compare(before, before, config=config)
    assert any(n.startswith("warning: ") and "cannot be told apart on any block" in n for n in itself.notes)
    frame = pd.DataFrame({"low": [-0.02, 0.01], "high": [0.03, 0.05]})
    assert not no_block_differs(frame)                  # block 1's interval excludes 0
    assert no_block_differs(frame.assign(low=[-0.02, -0.01]))
    assert not no_block_differs(frame.assign(low=[-0.02, float("nan")]))   # no interval: nothing to say
