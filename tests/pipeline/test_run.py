"""`run_pipeline` on a tiny spec: every step writes its folder, a re-run skips finished steps without touching
their files, an interrupted refinement resumes (its log keeps the earlier rows; a lost export comes back
identical), the steps after a re-run step run again, and a folder of another run is refused.

`run_compare` is replaced by a recorder here (the orchestration is under test, and the real report costs time);
tests/pipeline/test_demo.py runs the real one end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mimprobe.refinement
import mimprobe.report
from mimprobe.errors import BadInputError, MimprobeError
from mimprobe.pipeline import STEPS, dump_spec, load_spec, run_pipeline
from mimprobe.pipeline import run as run_module
from mimprobe.pipeline.run import RESOLVED_FILE

SPEC = '''\
name = "tiny"
out = "{out}"
model = "test_vit"
data = "synthetic:classes=4,train=12,test=10,size=32"
img_size = 32
threads = 1

[pretrain]
epochs = 1
batch_size = 16
lr = 1e-3
decoder_dim = 32
decoder_depth = 1
decoder_heads = 2

[profile]
metrics = ["knn"]
pool = ["cls"]

[place]
n = 2

[refine]
epochs_heads = 1
epochs = 1
batch_size = 16
lr = 1e-3
queue_size = 32
topk = 4
head_dims = [32, 16, 32]
'''  # 48 train images: 3 refinement steps per epoch, 6 in all


class FakeCompare:
    """Stands in for `run_compare`: records its inputs and writes the files that mark the step complete."""

    def __init__(self):
        self.calls = []

    def __call__(self, profiles, *, out, **options):
        self.calls.append({"profiles": [Path(p) for p in profiles], "out": Path(out), **options})
        Path(out).mkdir(parents=True, exist_ok=True)
        for name in ("report.html", "compare.json"):
            (Path(out) / name).write_text(name)


@pytest.fixture
def fake_compare(monkeypatch):
    fake = FakeCompare()
    monkeypatch.setattr(mimprobe.report, "run_compare", fake)
    return fake


def _spec(tmp_path: Path, name: str = "run") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(SPEC.format(out=tmp_path / name))
    return path


def _run(spec, **options):
    messages: list[str] = []
    result = run_pipeline(spec, progress=False, log=messages.append, **options)
    return result, messages


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(path.relative_to(run_dir)): path.stat().st_mtime_ns for path in run_dir.rglob("*")
            if path.is_file() and path.parent != run_dir}


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_rerun_skips_finished_steps_and_reruns_from_a_missing_export(tmp_path, fake_compare):
    spec = _spec(tmp_path)
    run_dir = tmp_path / "run"
    result, _ = _run(spec)
    assert [(r.name, r.status) for r in result.steps] == [(step.name, "ran") for step in STEPS]
    for step in STEPS:
        for marker in step.markers:
            assert (run_dir / step.folder / marker).is_file(), (step.folder, marker)
    # compare got the two profiles and the placement the refinement used
    (call,) = fake_compare.calls
    assert call["profiles"] == [run_dir / "profile-before", run_dir / "profile-after"]
    assert Path(call["placement"]) == run_dir / "placement" / "placement.json"
    after = json.loads((run_dir / "profile-after" / "profile.json").read_text())
    assert after["model"]["checkpoint"].endswith("refine/refined.safetensors")
    before = json.loads((run_dir / "profile-before" / "profile.json").read_text())
    assert before["model"]["checkpoint"].endswith("pretrain/mae.pth")
    assert load_spec(run_dir / RESOLVED_FILE) == load_spec(spec)

    mtimes = _mtimes(run_dir)
    result, messages = _run(spec)
    assert [r.status for r in result.steps] == ["skipped"] * len(STEPS)
    assert sum("done already" in m and "skipped" in m for m in messages) == len(STEPS)
    assert _mtimes(run_dir) == mtimes
    assert len(fake_compare.calls) == 1
    assert result.headline and result.headline[0]["metric"].startswith("k-NN")

    # an incomplete refinement (its export gone) resumes from its checkpoint; the steps after it run again
    log_rows = _rows(run_dir / "refine" / "log.csv")
    exported = load_file(run_dir / "refine" / "refined.safetensors")
    (run_dir / "refine" / "refined.safetensors").unlink()
    result, messages = _run(spec)
    assert [r.status for r in result.steps] == ["skipped"] * 3 + ["resumed", "ran", "ran"]
    assert any("resuming at step 6" in m for m in messages)
    assert _rows(run_dir / "refine" / "log.csv") == log_rows  # nothing retrained, nothing rewritten
    again = load_file(run_dir / "refine" / "refined.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    assert len(fake_compare.calls) == 2
    for name in ("pretrain/mae.pth", "profile-before/profile.json", "placement/placement.json"):
        assert _mtimes(run_dir)[name] == mtimes[name]


def test_refinement_stopped_mid_run_resumes_where_it_stopped(tmp_path, fake_compare, monkeypatch):
    spec = _spec(tmp_path)
    run_dir = tmp_path / "run"
    real_refine = mimprobe.refinement.run_refine
    monkeypatch.setattr(mimprobe.refinement, "run_refine",
                        lambda *args, **kwargs: real_refine(*args, **{**kwargs, "stop_after_steps": 4}))
    with pytest.raises(MimprobeError, match="refinement stopped at step 4 .*rerun the same command to resume"):
        _run(spec)
    first_rows = _rows(run_dir / "refine" / "log.csv")
    assert [row[0] for row in first_rows[1:]] == ["1", "2", "3", "4"]
    assert not (run_dir / "refine" / "refined.safetensors").exists()
    assert not (run_dir / "profile-after").exists()

    monkeypatch.setattr(mimprobe.refinement, "run_refine", real_refine)
    result, messages = _run(spec)
    assert [r.status for r in result.steps] == ["skipped"] * 3 + ["resumed", "ran", "ran"]
    assert any("resuming at step 4" in m for m in messages)
    rows = _rows(run_dir / "refine" / "log.csv")
    assert [row[0] for row in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    # the first four rows are the first call's, timings included: they were kept, not trained again
    assert rows[:5] == first_rows
    assert (run_dir / "refine" / "refined.safetensors").is_file() and len(fake_compare.calls) == 1


def test_a_folder_of_another_run_is_refused_unless_overwrite(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mine.txt").write_text("not a mimprobe run")
    with pytest.raises(BadInputError, match=r"holds other files \(mine.txt\): pass --overwrite"):
        _run(spec)

    (run_dir / "mine.txt").unlink()
    other = load_spec(spec).with_overrides({"refine": {"epochs": 3}, "seed": 1})
    (run_dir / RESOLVED_FILE).write_text(dump_spec(other))
    (run_dir / "refine").mkdir()
    (run_dir / "refine" / "log.csv").write_text("step\n")
    with pytest.raises(BadInputError, match=r"another spec's run \(seed: 1 -> 0; refine\.epochs: 3 -> 1\)"):
        _run(spec)
    assert (run_dir / "refine" / "log.csv").is_file()  # nothing deleted

    # --overwrite starts again: the other run's files go, the spec file is this spec's
    ran = []
    for name in list(run_module._RUNNERS):
        monkeypatch.setitem(run_module._RUNNERS, name,
                            lambda *args, name=name, **kwargs: ran.append(name) or ("ran", ""))
    _run(spec, overwrite=True)
    assert ran == [step.name for step in STEPS]
    assert not (run_dir / "refine").exists()
    assert load_spec(run_dir / RESOLVED_FILE) == load_spec(spec)
