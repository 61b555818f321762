"""The NNA trainer end to end on a tiny ViT: learning rates, stages, exact resume, export, CLI errors."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mimprobe._threads import cpu_threads
from mimprobe.cli import app
from mimprobe.models import load_model
from mimprobe.placement import place
from mimprobe.refinement import RefineConfig, run_refine
from mimprobe.refinement.checkpoint import CHECKPOINT, EXPORT
from mimprobe.refinement.heads import HeadConfig
from mimprobe.refinement.network import RefineNetwork
from mimprobe.refinement.optim import param_groups as _param_groups

MODEL = "test_vit"          # timm's 6-block, 64-wide test model
DATA = "synthetic:classes=4,train=12,test=4,size=32"   # 48 train images
TINY = RefineConfig(epochs_heads=1, epochs=1, batch_size=16, queue_size=32, topk=4, head_dims=(32, 16, 32),
                    img_size=32, lr=1e-3, warmup_fraction=0.2,
                    local_crops=0,   # global views only for speed; the defaults run in the CLI tests below
                    ema_decay=0.5)   # the official 0.9999 keeps a 3-step export within float32 rounding of the start
PLACEMENT = place(None, num_blocks=6, rule="last-n", n=2)


def refine(out: Path, config: RefineConfig = TINY, **options):
    with cpu_threads(1):
        return run_refine(MODEL, DATA, out=out, config=config, placement=options.pop("placement", PLACEMENT),
                          progress=False, **options)


def exported(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / EXPORT))


def test_layer_decay_learning_rates_follow_depth():
    encoder = timm.create_model(MODEL, img_size=32, num_classes=0)
    network = RefineNetwork(encoder, [4, 5], HeadConfig(32, 16, 32))
    config = RefineConfig(layer_decay=0.65)
    depth = len(encoder.blocks)
    scale_of = {}
    for group in _param_groups(network, config, stage=2):
        for param in group["params"]:
            scale_of[id(param)] = (group["lr_scale"], group["weight_decay"])
    for name, param in encoder.named_parameters():
        scale, decay = scale_of[id(param)]
        if name.startswith("blocks."):
            block = int(name.split(".")[1])
            assert scale == pytest.approx(0.65 ** (depth - block)), name
        elif name.startswith("norm."):
            assert scale == pytest.approx(1.0)
        else:  # cls_token, pos_embed, patch_embed: one step below block 0
            assert scale == pytest.approx(0.65 ** (depth + 1)), name
        assert decay == (0.0 if param.ndim <= 1 or name in ("cls_token", "pos_embed") else 0.05), name
    for name, param in network.heads.named_parameters():
        assert scale_of[id(param)] == (1.0, 0.0 if param.ndim <= 1 else 1e-5), name
    # stage 1 optimises the heads alone
    stage1 = {id(p) for g in _param_groups(network, config, stage=1) for p in g["params"]}
    assert stage1 == {id(p) for p in network.heads.parameters()}


def test_heads_only_stage_keeps_the_encoder_bit_identical(tmp_path):
    result = refine(tmp_path / "run", replace(TINY, epochs=0))
    before = load_model(MODEL, img_size=32, init_seed=TINY.seed).model.state_dict()
    after = exported(tmp_path / "run")
    assert set(after) == set(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert result.steps == 3 and state["step"] == 3
    heads = state["heads"]
    fresh = RefineNetwork(timm.create_model(MODEL, img_size=32, num_classes=0), [4, 5], HeadConfig(32, 16, 32))
    changed = [k for k, v in fresh.heads.state_dict().items() if k.endswith("weight") and not torch.equal(heads[k], v)]
    assert changed, "stage 1 must train the heads"


def test_stage_two_changes_the_encoder_and_logs_every_step(tmp_path):
    result = refine(tmp_path / "run", replace(TINY, monitor_images=24))
    before = load_model(MODEL, img_size=32, init_seed=TINY.seed).model.state_dict()
    after = exported(tmp_path / "run")
    assert any(not torch.equal(after[k], before[k]) for k in ("blocks.5.mlp.fc1.weight", "blocks.4.attn.qkv.weight"))
    with open(tmp_path / "run" / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [int(r["stage"]) for r in rows] == [1, 1, 1, 2, 2, 2]
    assert all(math.isfinite(float(r["loss"])) and float(r["images_per_second"]) > 0 for r in rows)
    loss = float(rows[0]["loss"])
    assert loss == pytest.approx(float(rows[0]["loss_block4"]) + float(rows[0]["loss_block5"]), rel=1e-6)
    assert [r["block"] for r in result.monitor] == [4, 5, 4, 5]
    assert [r["encoder"] for r in result.monitor] == ["encoder", "encoder", "ema", "ema"]
    # the last epoch's monitor is k-NN (k=10, T=0.07, standardised) of the exported EMA encoder's block-4 CLS
    # tokens: 24 seeded train images as the bank, 6 seeded test images as queries; recomputed from an extraction
    import numpy as np

    from mimprobe import extract
    from mimprobe.metrics.knn import KnnPreset, evaluate_knn

    store = extract(MODEL, DATA, out=tmp_path / "features", checkpoint=str(tmp_path / "run" / EXPORT), img_size=32,
                    blocks=[4], pool=("cls",), store_dtype="float32", progress=False).store
    rng = np.random.default_rng(TINY.seed)
    bank, query = rng.permutation(48)[:24], rng.permutation(16)[:6]
    train, test = np.asarray(store.features("train", 4)), np.asarray(store.features("test", 4))
    found = evaluate_knn(train[bank], store.labels("train")[bank], test[query], store.labels("test")[query],
                         preset=KnnPreset(name="mim-refiner", ks=(10,), temperatures=(0.07,), standardize=True,
                                          weighting="exp"), split="monitor", class_names=store.classes)
    expected = next(row.value for row in found if row.metric == "knn_top1")
    assert result.monitor[2]["knn_top1"] == pytest.approx(expected)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["head_blocks"] == [4, 5] and config["total_steps"] == 6


def test_logged_losses_are_the_nna_loss_of_each_head_written_out_with_loops(tmp_path, monkeypatch):
    """Every step's logged per-head loss is the NNA loss (mean over the ordered view pairs) of that head's
    projections, queue neighbours and predictions, recomputed by the loop reference of tests/refinement/test_loss.py,
    and the logged loss is their sum over heads (DESIGN.md)."""
    from mimprobe.refinement import engine
    from tests.refinement.test_loss import loop_loss

    calls = []
    original = engine.multi_view_nna_loss

    def recording(projections, neighbours, predictions, **kwargs):
        value = original(projections, neighbours, predictions, **kwargs)
        calls.append(([p.detach().clone() for p in projections], [n.detach().clone() for n in neighbours],
                      [p.detach().float().clone() for p in predictions], kwargs["temperature"], float(value)))
        return value

    monkeypatch.setattr(engine, "multi_view_nna_loss", recording)
    refine(tmp_path / "run", replace(TINY, epochs_heads=1, epochs=1))
    with open(tmp_path / "run" / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(calls) == 2 * len(rows)  # one call per head per step (one micro-batch)
    for step, row in enumerate(rows):
        per_head = []
        for head in range(2):
            projections, neighbours, predictions, temperature, _ = calls[2 * step + head]
            terms = [loop_loss(projections[a], neighbours[a], predictions[b], temperature)
                     for a in range(2) for b in range(len(predictions)) if b != a]
            per_head.append(sum(terms) / len(terms))
        assert float(row["loss_block4"]) == pytest.approx(per_head[0], rel=1e-4)
        assert float(row["loss_block5"]) == pytest.approx(per_head[1], rel=1e-4)
        assert float(row["loss"]) == pytest.approx(sum(per_head), rel=1e-4)


def test_frozen_blocks_stay_identical_in_stage_two(tmp_path):
    refine(tmp_path / "run", replace(TINY, epochs_heads=0, epochs=1), freeze=3)
    before = load_model(MODEL, img_size=32, init_seed=TINY.seed).model.state_dict()
    after = exported(tmp_path / "run")
    for key in before:
        frozen = key.startswith(("cls_token", "pos_embed", "patch_embed")) or \
            (key.startswith("blocks.") and int(key.split(".")[1]) < 3)
        assert torch.equal(after[key], before[key]) == frozen, key


@pytest.mark.parametrize("stop_at", [3, 4])  # at the end of the heads-only epoch, and inside stage 2
def test_resume_ends_with_identical_weights(tmp_path, stop_at):
    config = replace(TINY, epochs=2)
    refine(tmp_path / "straight", config)
    first = refine(tmp_path / "split", config, stop_after_steps=stop_at)
    assert first.stopped_early and first.export is None and first.steps == stop_at
    second = refine(tmp_path / "split", config, resume=True)
    assert second.steps == 9
    a, b = exported(tmp_path / "straight"), exported(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "split" / "log.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 10))


def test_export_loads_strictly_into_timm_and_mimprobe(tmp_path):
    refine(tmp_path / "run")
    path = tmp_path / "run" / EXPORT
    state = load_file(str(path))
    model = timm.create_model(MODEL, img_size=32, num_classes=0)
    model.load_state_dict(state, strict=True)
    overlay = timm.create_model(MODEL, pretrained=True, num_classes=0, img_size=32,
                                pretrained_cfg_overlay=dict(file=str(path)))
    loaded = load_model(MODEL, checkpoint=path, img_size=32)
    for key, value in state.items():
        assert torch.equal(overlay.state_dict()[key], value), key
        assert torch.equal(loaded.model.state_dict()[key], value), key
    info = json.loads((tmp_path / "run" / "refined.json").read_text())
    assert info["encoder"] == "ema" and info["head_blocks"] == [4, 5]
    # the exported tensors are the EMA's (MIM-Refiner evaluates and releases the EMA), not the trained encoder's
    checkpoint = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    ema, encoder = checkpoint["ema"], checkpoint["encoder"]
    for key, value in state.items():
        assert torch.equal(value, ema[f"module.{key}"]), key
    assert any(not torch.equal(state[key], encoder[key]) for key in ("blocks.5.mlp.fc1.weight", "norm.weight"))
    # the data config it was refined with travels in the file: profiling it uses the same normalisation
    config, source = loaded.eval_data_config(img_size=32)
    assert source.startswith("recorded in the checkpoint by mimprobe")
    assert config["mean"] == info["data_config"]["mean"] and config["std"] == info["data_config"]["std"]


def test_gradient_accumulation_runs_micro_batches(tmp_path):
    result = refine(tmp_path / "run", replace(TINY, accumulate=2, epochs=0))
    assert result.steps == 3


def _write_placement(path: Path, blocks: list[int], num_blocks: int) -> Path:
    placement = place(None, num_blocks=num_blocks, rule="explicit", blocks=blocks)
    path.write_text(json.dumps(placement.to_dict()))
    return path


COMMON = [MODEL, DATA, "--img-size", "32", "--head-dims", "32,16,32", "--no-progress", "--threads", "1",
          "--epochs-heads", "1", "--epochs", "0", "--topk", "4"]  # --topk at most the 16-long queues below


@pytest.mark.parametrize("extra, message", [
    (["--queue-size", "1000", "--batch-size", "16"], "larger than the training set"),
    (["--queue-size", "16", "--batch-size", "1"], "at least 2"),
    (["--queue-size", "8", "--topk", "20", "--batch-size", "8"], "--topk 20 is larger than --queue-size 8"),
    (["--queue-size", "16", "--batch-size", "16", "--checkpoint", "MISSING"], "checkpoint"),
    (["--queue-size", "16", "--batch-size", "16", "--placement", "BIG"], "block 20"),
    (["--queue-size", "16", "--batch-size", "16", "--placement", "SMALL", "--auto"], "not both"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, extra, message):
    big = _write_placement(tmp_path / "big.json", [20, 23], 24)
    small = _write_placement(tmp_path / "small.json", [5], 6)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a checkpoint")
    extra = [{"MISSING": str(damaged), "BIG": str(big), "SMALL": str(small)}.get(x, x) for x in extra]
    if "--placement" not in extra:
        extra += ["--placement", str(small)]
    result = CliRunner().invoke(app, ["refine", *COMMON, *extra, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


@pytest.mark.parametrize("model, size", [("convnextv2_atto", ["--img-size", "32"]),
                                         ("swin_tiny_patch4_window7_224", []), ("hiera_tiny_224", [])])
def test_hierarchical_models_are_refused_before_anything_is_written(model, size, tmp_path):
    small = _write_placement(tmp_path / "small.json", [5], 6)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["refine", model, DATA, *size, "--placement", str(small), "--no-progress",
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "ViT token models only" in lines[0] and model in lines[0], result.output
    assert not out.exists()


def test_out_with_another_run_is_refused_then_overwritten(tmp_path):
    small = _write_placement(tmp_path / "small.json", [5], 6)
    args = ["refine", *COMMON, "--queue-size", "16", "--batch-size", "16", "--placement", str(small),
            "--out", str(tmp_path / "run")]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output and "--overwrite" in again.output
    assert (tmp_path / "run" / EXPORT).is_file()  # nothing lost
    assert CliRunner().invoke(app, [*args, "--overwrite", "--json"]).exit_code == 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mimprobe.cli", *args]


@pytest.mark.slow  # subprocesses (torch, timm) under torchrun/SIGTERM: 40-85 s under load here; CI runs it
def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    small = _write_placement(tmp_path / "small.json", [5], 6)
    out = tmp_path / "run"
    args = ["refine", MODEL, "synthetic:classes=4,train=40,test=4,size=32", "--img-size", "32", "--head-dims",
            "32,16,32", "--no-progress", "--threads", "1", "--epochs-heads", "1", "--epochs", "1", "--queue-size",
            "32", "--batch-size", "8", "--placement", str(small), "--out", str(out)]
    process = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = out / "log.csv"
        if log.exists() and len(log.read_text().splitlines()) >= 4:  # header + 3 steps
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "--resume" in output and (out / CHECKPOINT).is_file() and not (out / EXPORT).exists()
    stopped_at = torch.load(out / CHECKPOINT, weights_only=True)["step"]
    assert 3 <= stopped_at < 40
    finished = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert (out / EXPORT).is_file()
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 40


@pytest.mark.slow  # subprocesses (torch, timm) under torchrun/SIGTERM: 40-85 s under load here; CI runs it
@pytest.mark.distributed
def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path):
    small = _write_placement(tmp_path / "small.json", [4, 5], 6)
    common = ["refine", MODEL, DATA, "--img-size", "32", "--head-dims", "32,16,32", "--no-progress",
              "--threads", "1", "--epochs-heads", "1", "--epochs", "0", "--queue-size", "32", "--batch-size", "16",
              "--placement", str(small), "--device", "cpu"]
    single = subprocess.run(_cli(*common, "--out", str(tmp_path / "one")), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "mimprobe.cli", *common, "--out", str(tmp_path / "two")]
    double = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-3000:]

    def first_step(run: str) -> dict[str, float]:
        with open(tmp_path / run / "log.csv", newline="") as handle:
            row = next(csv.DictReader(handle))
        return {key: float(value) for key, value in row.items() if value != ""}  # ema_progress: at epoch ends

    one, two = first_step("one"), first_step("two")
    for key in ("loss", "loss_block4", "loss_block5", "lr"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    resolved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert resolved["world_size"] == 2


def test_local_crops_are_predicted_views(tmp_path):
    """Two extra 16 px crops run through a dynamic-size copy of the encoder; the loss then averages 2 x 3 pairs."""
    result = refine(tmp_path / "run", replace(TINY, local_crops=2, local_size=16, epochs=1))
    assert result.steps == 6 and math.isfinite(result.last_loss)
    before = load_model(MODEL, img_size=32, init_seed=TINY.seed).model.state_dict()
    after = exported(tmp_path / "run")
    assert set(after) == set(before)  # the export stays a plain 32 px timm state dict
    assert after["pos_embed"].shape == before["pos_embed"].shape
    assert not torch.equal(after["blocks.5.mlp.fc1.weight"], before["blocks.5.mlp.fc1.weight"])


@pytest.mark.parametrize("epochs_heads", [0, 1])
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_after_the_first_stage_two_step(tmp_path, warmup, epochs_heads):
    """Default: ema = d * w0 + (1 - d) * w1 after the first update (no warmup); --ema-warmup: timm's warmup, whose
    first update copies the weights (decay 0), counted from the start of stage 2 (after 3 heads-only steps too)."""
    config = replace(TINY, epochs_heads=epochs_heads, epochs=1, lr=0.1, warmup_fraction=0.0, ema_decay=0.9,
                     ema_warmup=warmup)
    refine(tmp_path / "run", config, stop_after_steps=3 * epochs_heads + 1)
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    w0 = load_model(MODEL, img_size=32, init_seed=TINY.seed).model.state_dict()
    w1, ema = state["encoder"], state["ema"]
    for key in ("blocks.5.mlp.fc1.weight", "blocks.0.attn.qkv.weight", "norm.weight"):
        assert (w1[key] - w0[key]).abs().max() > 1e-4, key      # the step moved the weights (Adam: ~lr each)
        expected = w1[key] if warmup else 0.9 * w0[key] + 0.1 * w1[key]
        assert torch.allclose(ema[f"module.{key}"], expected, atol=1e-6), key


def test_stage_one_takes_the_nearest_neighbour_whatever_topk(tmp_path):
    """The heads-only stage uses the top-1 neighbour (the official stage 2); --topk acts in stage 2 only: the same
    run with --topk 4 and --topk 1 logs the same stage-1 losses and different stage-2 losses."""
    losses = {}
    for topk in (1, 4):
        refine(tmp_path / f"top{topk}", replace(TINY, topk=topk))
        with open(tmp_path / f"top{topk}" / "log.csv", newline="") as handle:
            losses[topk] = [(int(r["stage"]), float(r["loss"])) for r in csv.DictReader(handle)]
    stage1 = [[loss for stage, loss in losses[t] if stage == 1] for t in (1, 4)]
    stage2 = [[loss for stage, loss in losses[t] if stage == 2] for t in (1, 4)]
    assert len(stage1[0]) == 3 and stage1[0] == stage1[1]
    assert len(stage2[0]) == 3 and stage2[0] != stage2[1]


def test_resume_with_another_option_is_refused_and_keeps_the_checkpoint(tmp_path):
    from mimprobe.errors import BadInputError

    out = tmp_path / "run"
    refine(out, TINY, stop_after_steps=2)
    saved = (out / CHECKPOINT).read_bytes()
    for changed, name in ((replace(TINY, lr=2e-3), "lr"), (replace(TINY, topk=2), "topk")):
        with pytest.raises(BadInputError, match=rf"--resume with other config .*{name}: "):
            refine(out, changed, resume=True)
    assert (out / CHECKPOINT).read_bytes() == saved  # nothing lost
    assert refine(out, TINY, resume=True).steps == 6


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_its_schedule_over_steps_and_resumes(tmp_path, warmup):
    """Three stage-2 updates, each run resumed from the last (the EMA is rebuilt from the checkpoint each time):
    without warmup ema_t = d ema_(t-1) + (1 - d) w_t from ema_0 = w0 (d = 0.9); with --ema-warmup timm's decay per
    update u (from the stage start) is 0, 0, then 1 - 2^(-2/3) (capped at d)."""
    config = replace(TINY, epochs_heads=0, epochs=1, lr=0.05, warmup_fraction=0.0, ema_decay=0.9, ema_warmup=warmup)
    out = tmp_path / "run"
    weights = [load_model(MODEL, img_size=32, init_seed=TINY.seed).model.state_dict()]
    emas = []
    for step in (1, 2, 3):
        refine(out, config, stop_after_steps=step, resume=step > 1)
        state = torch.load(out / CHECKPOINT, weights_only=True)
        assert state["step"] == step
        weights.append(state["encoder"])
        emas.append(state["ema"])
    decays = [0.0, 0.0, min(0.9, 1 - 2 ** (-2 / 3))] if warmup else [0.9, 0.9, 0.9]
    for key in ("blocks.5.mlp.fc1.weight", "blocks.1.attn.proj.weight", "norm.weight"):
        expected = weights[0][key]
        for step, decay in enumerate(decays, start=1):
            expected = decay * expected + (1 - decay) * weights[step][key]
            assert torch.allclose(emas[step - 1][f"module.{key}"], expected, atol=1e-6), (key, step)


# ------------------------------------------------------------------------------------- scaled to the run (issue 19)

def _start_and_trained(out: Path) -> tuple[dict, dict, dict]:
    """The starting encoder's, the trained encoder's and the EMA's parameters of a finished run (float64)."""
    state = torch.load(out / CHECKPOINT, weights_only=True)
    model = load_model(MODEL, img_size=32, init_seed=TINY.seed).model
    names = [name for name, _ in model.named_parameters()]
    start = model.state_dict()
    return ({n: start[n].double() for n in names}, {n: state["encoder"][n].double() for n in names},
            {n: state["ema"][f"module.{n}"].double() for n in names})


def _ema_progress_by_hand(start: dict, trained: dict, ema: dict) -> float:
    flat = {side: torch.cat([values[n].flatten() for n in start]) for side, values in
            (("start", start), ("trained", trained), ("ema", ema))}
    return float(torch.linalg.vector_norm(flat["ema"] - flat["start"])
                 / torch.linalg.vector_norm(flat["trained"] - flat["start"]))


def test_a_short_default_run_moves_the_export_and_says_how_the_ema_was_scaled(tmp_path):
    """The default EMA (None) on a 6-step full stage: decay from the official time constant as a share of the stage,
    stated at start-up and in config.json with its sources; ema_progress (equal to the norms computed by hand from
    the checkpoint) >= 0.5 in log.csv, the summary and config.json. The official 0.9999, given explicitly, leaves
    the export at the start (ema_progress ~ 0.001) and the run warns."""
    messages: list[str] = []
    out = tmp_path / "scaled"
    result = refine(out, replace(TINY, ema_decay=None, epochs=2), log=messages.append)
    resolved = json.loads((out / "config.json").read_text())
    tau = 6 * 10_000 / 37_530
    assert resolved["config"]["ema_decay"] == pytest.approx(1 - 1 / tau)
    scaled = resolved["scaled"]["ema_decay"]
    assert scaled["official"] == 0.9999 and "l16_mae.yaml:200-204" in scaled["source"] and "37,530" in scaled["rule"]
    assert any(m.startswith(f"EMA: decay {1 - 1 / tau:.6g}") and "37,530" in m for m in messages)
    expected = _ema_progress_by_hand(*_start_and_trained(out))
    assert result.ema_progress == pytest.approx(expected, rel=1e-9) and expected >= 0.5
    assert result.summary()["ema_progress"] == result.ema_progress == resolved["ema_progress"]
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = [(int(r["step"]), r["ema_progress"]) for r in rows if r["ema_progress"]]
    assert [step for step, _ in logged] == [6, 9] and float(logged[-1][1]) == pytest.approx(expected, rel=1e-9)
    assert not any(m.startswith("warning: the exported EMA") for m in messages)

    messages.clear()
    official = refine(tmp_path / "official", replace(TINY, ema_decay=0.9999, epochs=2), log=messages.append)
    assert official.ema_progress == pytest.approx(_ema_progress_by_hand(*_start_and_trained(tmp_path / "official")),
                                                  rel=1e-9)
    assert official.ema_progress < 0.01
    assert any(m.startswith("warning: the exported EMA encoder moved only 0%") for m in messages)
    assert "ema_decay" not in json.loads((tmp_path / "official" / "config.json").read_text())["scaled"]


def test_start_up_states_local_crops_head_widths_step_time_and_checkpoint_size(tmp_path):
    """On the CPU at 32 px: local crops of 96/224 of 32 px (one 16 px patch) and head widths in proportion to the
    64-wide test_vit (128, 16, 256) are said and recorded; the measured step time is said per stage; the expected
    checkpoint and export sizes are within 5 % of the files written."""
    messages: list[str] = []
    out = tmp_path / "run"
    config = replace(TINY, head_dims="auto", local_crops=2)
    refine(out, config, log=messages.append)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["config"]["head_dims"] == [128, 16, 256]
    assert resolved["scaled"]["head_dims"]["value"] == [128, 16, 256]
    assert resolved["scaled"]["local_size"]["value"] == 16
    assert any(m.startswith("head_dims: [128, 16, 256] (official [2048, 256, 4096]") for m in messages)
    assert any(m.startswith("local_size: 16 (official 96") and "96/224 of the 32 px input" in m for m in messages)
    assert sum(" s per step (" in m and "median of its first 3 steps" in m for m in messages) == 2
    expected = resolved["expected_bytes"]
    assert (out / CHECKPOINT).stat().st_size == pytest.approx(expected["checkpoint"], rel=0.05)
    assert (out / EXPORT).stat().st_size == pytest.approx(expected["export"], rel=0.02)
    assert any(m.startswith("expected sizes: checkpoint-last.pth about") for m in messages)


def test_save_every_exports_each_epoch_and_profile_reads_them_as_a_series(tmp_path):
    """--save-every 1: checkpoint-{epoch}.safetensors after each epoch; the heads-only epoch's is the starting
    encoder, the last equals refined.safetensors byte for byte, and `mimprobe profile --checkpoint RUN` profiles
    the run as a series in epoch order. --overwrite deletes the snapshots; a resume may change --save-every."""
    import mimprobe

    out = tmp_path / "run"
    refine(out, replace(TINY, epochs=2, save_every=1))
    names = sorted(path.name for path in out.glob("checkpoint-*.safetensors"))
    assert names == ["checkpoint-1.safetensors", "checkpoint-2.safetensors", "checkpoint-3.safetensors"]
    start = load_model(MODEL, img_size=32, init_seed=TINY.seed).model.state_dict()
    first = load_file(str(out / "checkpoint-1.safetensors"))
    assert all(torch.equal(first[key], start[key]) for key in start)           # stage 1 leaves the encoder alone
    assert (out / "checkpoint-3.safetensors").read_bytes() == (out / EXPORT).read_bytes()
    assert not torch.equal(load_file(str(out / "checkpoint-2.safetensors"))["blocks.5.mlp.fc1.weight"],
                           start["blocks.5.mlp.fc1.weight"])
    series = mimprobe.profile(MODEL, DATA, checkpoint=str(out), out=str(tmp_path / "series"), img_size=32,
                              metrics="knn", preset="dino", progress=False)
    assert list(dict.fromkeys(series.table["checkpoint_order"])) == [0, 1, 2]
    assert list(dict.fromkeys(series.table["checkpoint"])) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    refine(out, replace(TINY, epochs=2), overwrite=True)            # the old snapshots go with the old run
    assert not list(out.glob("checkpoint-*.safetensors"))
    stopped = refine(tmp_path / "resumed", replace(TINY, epochs=2), stop_after_steps=4)
    assert stopped.stopped_early
    refine(tmp_path / "resumed", replace(TINY, epochs=2, save_every=2), resume=True)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*.safetensors")) == \
        ["checkpoint-2.safetensors", "checkpoint-3.safetensors"]
