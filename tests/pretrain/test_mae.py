"""MAE pre-training: masking, patchify, sin-cos tables and the loss against the official formulas (numpy
transcriptions of facebookresearch/mae), the encoder against timm's own forward, learning, the exported checkpoint
through mimprobe's loader, exact resume, and the CLI."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from mimprobe.cli import app
from mimprobe.models import detect_format, load_model, read_checkpoint, unwrap_checkpoint
from mimprobe.pretrain import (MaeConfig, Masking, MaskedAutoencoder, mae_lr, masked_patch_loss, num_visible,
                               patchify, random_masking, run_pretrain_mae, sincos_pos_embed, unpatchify)
from mimprobe.pretrain import train as train_module

SMALL = "synthetic:classes=2,train=4,test=1,size=16"  # 8 train images
TINY = dict(img_size=64, batch_size=4, decoder_dim=32, decoder_depth=1, decoder_heads=2, lr=1e-3, warmup_epochs=0.5)
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is many times faster than two on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _encoder(img_size: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=0, img_size=img_size)


def _mae(seed: int = 0) -> MaskedAutoencoder:
    encoder = _encoder(seed=seed)
    return MaskedAutoencoder(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)


# --- official formulas, transcribed from facebookresearch/mae (util/pos_embed.py, models_mae.py) ----------

def official_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def official_loss(pred: np.ndarray, images: np.ndarray, mask: np.ndarray, p: int, norm_pix: bool) -> float:
    """Per-patch loops instead of reshapes: patch (i, j) of image n holds pixels [c, i*p + a, j*p + b] at
    position (a*p + b)*C + c."""
    n, c, height, width = images.shape
    h, w = height // p, width // p
    total, count = 0.0, 0.0
    for k in range(n):
        for i in range(h):
            for j in range(w):
                target = np.array([images[k, ch, i * p + a, j * p + b]
                                   for a in range(p) for b in range(p) for ch in range(c)], dtype=np.float64)
                if norm_pix:
                    target = (target - target.mean()) / math.sqrt(target.var(ddof=1) + 1e-6)
                patch_loss = np.mean((pred[k, i * w + j] - target) ** 2)
                total += patch_loss * mask[k, i * w + j]
                count += mask[k, i * w + j]
    return total / count


# --- compute ------------------------------------------------------------------------------------------

def test_mask_keeps_round_n_patches_and_differs_across_samples():
    generator = torch.Generator().manual_seed(0)
    for num_patches, ratio in ((16, 0.75), (64, 0.75), (196, 0.75), (10, 0.9), (10, 0.6)):
        masking = random_masking(8, num_patches, ratio, generator=generator)
        keep = round(num_patches * (1 - ratio))
        assert num_visible(num_patches, ratio) == keep
        assert masking.ids_keep.shape == (8, keep)
        assert torch.equal(masking.mask.sum(1), torch.full((8,), float(num_patches - keep)))
        visible = torch.gather(masking.mask, 1, masking.ids_keep)
        assert visible.sum() == 0  # the kept ids are exactly the zeros of the mask
        assert all(len(set(row.tolist())) == keep for row in masking.ids_keep)
        assert len({tuple(row.tolist()) for row in masking.mask}) > 1  # per-sample masks
    with pytest.raises(ValueError, match="keeps 0 of 4"):
        random_masking(2, 4, 0.9)


def test_patchify_matches_the_per_patch_layout_and_round_trips():
    images = torch.randn(2, 3, 12, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch (i=1, j=1) of image 1: pixel (a, b, c) at (a*4 + b)*3 + c
    assert patches[1, 1 * 2 + 1, (2 * 4 + 3) * 3 + 1] == images[1, 1, 4 + 2, 4 + 3]
    assert torch.equal(unpatchify(patches, 4, (3, 2)), images)


def test_sincos_table_equals_official_mae():
    for dim, grid in ((64, 4), (192, 8), (32, 14)):
        ours = sincos_pos_embed((grid, grid), dim)
        assert ours.shape == (1, 1 + grid * grid, dim)
        np.testing.assert_allclose(ours[0].numpy(), official_sincos(dim, grid), atol=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_the_official_formula_on_a_fixed_mask(norm_pix):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    ours = masked_patch_loss(pred, patchify(images, 4), mask, norm_pix=norm_pix)
    assert ours.item() == pytest.approx(official_loss(pred.numpy(), images.numpy(), mask.numpy(), 4, norm_pix),
                                        rel=1e-5)


def test_loss_ignores_visible_patches():
    torch.manual_seed(2)
    target = torch.randn(3, 16, 12)
    pred = torch.randn(3, 16, 12)
    mask = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(0)).mask
    base = masked_patch_loss(pred, target, mask)
    changed_visible = torch.where(mask.bool().unsqueeze(-1), pred, pred + 100.0)
    assert torch.equal(masked_patch_loss(changed_visible, target, mask), base)
    changed_masked = torch.where(mask.bool().unsqueeze(-1), pred + 1.0, pred)
    assert masked_patch_loss(changed_masked, target, mask) > base + 0.5


def test_encoder_on_all_patches_equals_timm_forward_features():
    mae = _mae().eval()
    images = torch.randn(2, 3, 64, 64)
    order = torch.arange(16).expand(2, -1)
    everything = Masking(ids_keep=order, ids_restore=order, mask=torch.zeros(2, 16))
    with torch.no_grad():
        ours = mae.forward_encoder(images, everything)
        reference = mae.encoder.forward_features(images)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert not mae.encoder.pos_embed.requires_grad and torch.equal(mae.encoder.pos_embed[0, 0], torch.zeros(64))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    mae = _mae()
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    images = torch.stack([torch.sin(2 * math.pi * f * (cols + 0.5 * rows) / 64).expand(3, -1, -1)
                          for f in (1.0, 2.0, 3.0, 1.5)])  # gratings: masked patches are predictable
    masking = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(40):
        loss = mae(images, masking=masking).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def _simmim(seed: int = 0) -> MaskedAutoencoder:
    return MaskedAutoencoder(_encoder(seed=seed), decoder_depth=0)


def test_linear_head_encoder_equals_timm_when_the_mask_token_is_the_hidden_patch():
    """SimMIM (decoder_depth=0): hidden patches enter the encoder as the mask token. On an image of identical
    patches whose embedding is the mask token, hiding patches changes nothing, so the output is timm's own
    forward_features on the whole image; with any other mask token it differs."""
    mae = _simmim().eval()
    images = torch.randn(2, 3, 16, 16).repeat(1, 1, 4, 4)  # (2, 3, 64, 64): 16 identical 16-px patches per image
    masking = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = mae.encoder.forward_features(images)  # (2, 17, 64)
        patch = mae.encoder.patch_embed(images[:1]).reshape(1, 16, -1)[:, :1]  # (1, 1, 64)
        images = images[:1].expand(2, -1, -1, -1)
        reference = reference[:1].expand(2, -1, -1)
        mae.mask_token.copy_(patch)
        ours = mae.forward_encoder(images, masking)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
        mae.mask_token.add_(torch.randn(64))  # not a constant: pre-norm blocks ignore a shift of all channels
        assert (mae.forward_encoder(images, masking) - reference).abs().max() > 1e-2
    assert ours.shape == (2, 17, 64)  # every patch, not only the visible ones


def test_linear_head_never_sees_hidden_pixels_and_trains_the_encoder():
    mae = _simmim()
    assert sorted(name for name, _ in mae.named_parameters() if not name.startswith("encoder.")) == [
        "decoder_pred.bias", "decoder_pred.weight", "mask_token"]
    assert mae.mask_token.shape == (1, 1, 64) and mae.decoder_pred.weight.shape == (16 * 16 * 3, 64)
    images = torch.randn(2, 3, 64, 64)
    masking = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(3))
    hidden = unpatchify(masking.mask.unsqueeze(-1).expand(-1, -1, 16 * 16 * 3), 16, (4, 4)).bool()
    mae.eval()
    with torch.no_grad():
        base = mae(images, masking=masking).pred
        same = mae(torch.where(hidden, images + 5.0, images), masking=masking).pred  # hidden pixels changed
        moved = mae(torch.where(hidden, images, images + 5.0), masking=masking).pred  # visible pixels changed
    torch.testing.assert_close(same, base)
    assert (moved - base).abs().max() > 1e-2
    mae.train()
    mae(images, masking=masking).loss.backward()  # the hidden patches' loss reaches the first block
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_lr_schedule_warms_up_linearly_then_follows_the_cosine():
    lrs = [mae_lr(step, total_steps=100, warmup_steps=10, peak_lr=1.0, min_lr=0.1) for step in range(101)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert MaeConfig(batch_size=512).peak_lr() == pytest.approx(3e-4)


def test_encoders_without_one_class_token_are_refused():
    with pytest.raises(ValueError, match="lacks cls_token"):
        MaskedAutoencoder(timm.create_model("test_vit2", num_classes=0, img_size=64))
    with pytest.raises(ValueError, match="exactly one class token"):
        MaskedAutoencoder(timm.create_model("test_vit", num_classes=0, img_size=64, reg_tokens=2))


# --- run_pretrain_mae: export, loading, continuing, resume --------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("mae-run")
    loaded = load_model("test_vit", img_size=64)
    initial = {key: value.clone() for key, value in loaded.model.state_dict().items()}
    result = run_pretrain_mae(loaded, SMALL, out=out, epochs=2, progress=False, **TINY)
    return result, loaded, initial


def test_export_is_an_official_mae_file_that_loads_strictly(trained):
    result, loaded, initial = trained
    raw = torch.load(result.export, map_location="cpu", weights_only=True)
    assert list(raw) == ["model", "data_config"]  # the official layout, plus the normalisation it trained with
    assert raw["data_config"]["mean"] == list(timm.create_model("test_vit").pretrained_cfg["mean"])
    state, _ = unwrap_checkpoint(raw)
    assert detect_format(state) == "mae"
    assert state["pos_embed"].shape == (1, 17, 64) and torch.equal(state["pos_embed"][0, 0], torch.zeros(64))
    assert state["mask_token"].shape == (1, 1, 32) and state["decoder_pred.weight"].shape == (16 * 16 * 3, 32)
    assert {key for key in state if not key.startswith(("blocks.", "decoder_"))} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
        "mask_token"}

    reloaded = load_model("test_vit", checkpoint=result.export, img_size=64)
    assert reloaded.checkpoint_format == "mae"
    # profiled with the normalisation it was trained with, not the MAE release files' ImageNet one
    config, source = reloaded.eval_data_config(img_size=64)
    assert config["mean"] == raw["data_config"]["mean"] and source.startswith("recorded in the checkpoint")
    trained_encoder = loaded.model.state_dict()
    reloaded_state = reloaded.model.state_dict()
    assert reloaded_state.keys() == trained_encoder.keys()
    for key, value in trained_encoder.items():
        assert torch.equal(reloaded_state[key], value), key
    assert not torch.equal(trained_encoder["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    assert torch.equal(trained_encoder["pos_embed"], sincos_pos_embed((4, 4), 64))  # frozen during training


def test_linear_head_run_exports_a_file_that_loads_strictly(tmp_path):
    loaded = load_model("test_vit", img_size=64)
    messages = []
    result = run_pretrain_mae(loaded, SMALL, out=tmp_path, epochs=1, progress=False, log=messages.append,
                              **{**TINY, "decoder_depth": 0})
    assert any(message.startswith("SimMIM-style pre-training") for message in messages), messages
    state, _ = unwrap_checkpoint(torch.load(result.export, map_location="cpu", weights_only=True))
    assert {key for key in state if not key.startswith("blocks.")} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
        "mask_token", "decoder_pred.weight", "decoder_pred.bias"}
    assert state["mask_token"].shape == (1, 1, 64)  # the encoder's width: it enters the encoder
    reloaded = load_model("test_vit", checkpoint=result.export, img_size=64)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key
    again = run_pretrain_mae("test_vit", SMALL, out=tmp_path / "again", checkpoint=str(result.export), epochs=1,
                             progress=False, log=messages.append, **{**TINY, "decoder_depth": 0, "lr": 1e-12})
    assert any("continuing the MAE decoder" in message for message in messages), messages
    torch.testing.assert_close(torch.load(again.export, weights_only=True)["model"]["decoder_pred.weight"],
                               state["decoder_pred.weight"], atol=1e-8, rtol=0)


def test_run_files_record_the_config_and_every_step(trained):
    result = trained[0]
    config = json.loads((result.out / "config.json").read_text())
    assert config["complete"] and config["config"]["epochs"] == 2 and config["resolved"]["visible_patches"] == 4
    assert config["versions"]["timm"] == timm.__version__ and config["model"]["name"] == "test_vit"
    with open(result.out / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4] and [row["epoch"] for row in rows] == list("1122")
    assert float(rows[0]["lr"]) == 0 and float(rows[1]["lr"]) == pytest.approx(1e-3)
    assert result.epoch_losses == pytest.approx([np.mean([float(r["loss"]) for r in rows[:2]]),
                                                 np.mean([float(r["loss"]) for r in rows[2:]])], rel=1e-5)
    state = read_checkpoint(result.out / "checkpoint-last.pth")  # weights_only=True
    assert state["epoch"] == 2 and state["step"] == 4 and state["config"]["batch_size"] == 4


def test_checkpoint_continues_encoder_and_decoder(trained, tmp_path):
    result = trained[0]
    messages = []
    again = run_pretrain_mae("test_vit", SMALL, out=tmp_path, checkpoint=str(result.export), epochs=1,
                             progress=False, log=messages.append, **{**TINY, "lr": 1e-12})
    assert any("continuing the MAE decoder" in message for message in messages), messages
    before = torch.load(result.export, weights_only=True)["model"]
    after = torch.load(again.export, weights_only=True)["model"]
    assert before.keys() == after.keys()
    for key in before:  # lr 1e-12: one step moves nothing measurably, so every weight came from the file
        torch.testing.assert_close(after[key], before[key], atol=1e-8, rtol=0)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    options = dict(epochs=2, progress=False, seed=5, **{**TINY, "batch_size": 2})  # 4 steps per epoch
    whole = run_pretrain_mae("test_vit", SMALL, out=tmp_path / "whole", **options)

    real_lr = train_module.mae_lr

    def killed_in_epoch_two(step, **kwargs):
        if step == 5:  # two steps into epoch 2: one is logged and applied but not checkpointed
            raise KeyboardInterrupt
        return real_lr(step, **kwargs)

    monkeypatch.setattr(train_module, "mae_lr", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain_mae("test_vit", SMALL, out=tmp_path / "resumed", **options)
    assert not (tmp_path / "resumed" / "mae.pth").exists()
    monkeypatch.setattr(train_module, "mae_lr", real_lr)
    with pytest.raises(Exception, match="holds another pre-training run"):
        run_pretrain_mae("test_vit", SMALL, out=tmp_path / "resumed", **options)
    resumed = run_pretrain_mae("test_vit", SMALL, out=tmp_path / "resumed", resume=True, **options)
    assert resumed.resumed and resumed.epochs_this_call == 1 and resumed.epoch_losses == whole.epoch_losses

    whole_state = torch.load(whole.export, weights_only=True)["model"]
    resumed_state = torch.load(resumed.export, weights_only=True)["model"]
    assert all(torch.equal(whole_state[key], resumed_state[key]) for key in whole_state)

    def steps(path):
        with open(path / "log.csv") as handle:
            return [(row["step"], row["epoch"], row["loss"], row["lr"]) for row in csv.DictReader(handle)]

    assert steps(tmp_path / "resumed") == steps(tmp_path / "whole") and len(steps(tmp_path / "whole")) == 8
    with pytest.raises(Exception, match=r"other settings: seed=5 \(now 6\)"):
        run_pretrain_mae("test_vit", SMALL, out=tmp_path / "resumed", resume=True, **{**options, "seed": 6})


# --- CLI ----------------------------------------------------------------------------------------------------

CLI_TINY = ["--img-size", "64", "--batch-size", "4", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2", "--epochs", "1", "--no-progress"]


def test_cli_happy_path_then_the_printed_checkpoint_loads(tmp_path):
    result = runner.invoke(app, ["pretrain-mae", "test_vit", SMALL, "--out", str(tmp_path / "run"), *CLI_TINY])
    assert result.exit_code == 0, result.output
    assert f"mae.pth: {tmp_path / 'run' / 'mae.pth'} (1 epochs, 2 steps, loss" in result.stdout
    assert f"mimprobe profile test_vit {SMALL} --checkpoint {tmp_path / 'run' / 'mae.pth'} --img-size 64" \
        in result.stdout
    info = runner.invoke(app, ["info", "test_vit", "--checkpoint", str(tmp_path / "run" / "mae.pth"),
                               "--img-size", "64", "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["checkpoint_format"] == "mae"

    again = runner.invoke(app, ["pretrain-mae", "test_vit", SMALL, "--out", str(tmp_path / "run"), *CLI_TINY,
                                "--resume", "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["resumed"] and summary["epochs_this_call"] == 0 and summary["steps"] == 2


BAD_CLI = {
    "mask ratio 1": (["--mask-ratio", "1.0"], r"--mask-ratio must be between 0 and 1"),
    "mask ratio 0": (["--mask-ratio", "0"], r"--mask-ratio must be between 0 and 1"),
    "batch of one": (["--batch-size", "1"], r"--batch-size must be at least 2"),
    "image size": (["--img-size", "40"], r"--img-size 40 is not divisible by the patch size 16"),
    "too few patches": (["--img-size", "16"], r"gives 1 patches of 16 px"),
    "negative decoder depth": (["--decoder-depth", "-1"], r"decoder-depth"),
    "batch larger than data": (["--batch-size", "64"], r"train split has 8 images, fewer than --batch-size 64"),
    "resume and overwrite": (["--resume", "--overwrite"], r"either --resume .* or --overwrite .*, not both"),
}


@pytest.mark.parametrize("case", list(BAD_CLI) + ["missing data", "another run"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, case):
    data, extra, pattern = SMALL, [], None
    if case == "missing data":
        data, pattern = str(tmp_path / "nope"), r"data '.*nope' not found"
    elif case == "another run":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "log.csv").write_text("step\n")
        pattern = r"holds another pre-training run \(log\.csv\): pass --resume .* --overwrite"
    else:
        extra, pattern = BAD_CLI[case]
    args = ["pretrain-mae", "test_vit", data, "--out", str(tmp_path / "run"), *CLI_TINY, *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
