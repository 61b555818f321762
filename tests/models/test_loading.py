"""Loading checkpoints of every supported format into timm's ``test_vit`` and checking the outputs.

Each synthetic checkpoint is written FROM known weights (a seeded reference timm model, or explicit tensors for
the post-norm formats), so the loaded model must reproduce the reference's ``forward_features`` exactly. The
post-norm formats (data2vec 2.0, refined data2vec) are checked against an independent forward written here with
explicit tensor math, not against mimprobe's own `PostNormBlock`.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mimprobe.errors import BadInputError, CheckpointError, DownloadError
from mimprobe.models import LoadedModel, describe_model, load_model

MODEL = "test_vit"
IMG = 48  # 3x3 patches: small, but rows and columns of the position grid differ
PATCH = 16
WIDTH = 64
DEPTH = 6
HEADS = 2
MLP_HIDDEN = 192  # test_vit's mlp_ratio is 3
EPS = 1e-6  # timm's LayerNorm eps for ViTs
D2V = "modality_encoders.IMAGE."


# --- reference weights -------------------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with distinctive random values, so that any misplaced tensor changes outputs
    (timm's init leaves LayerNorms at 1/0 and the CLS token near zero, which would hide swaps)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.ndim >= 2 and not name.endswith(("_token", "pos_embed")):
                fan_in = math.prod(param.shape[1:])
                param.copy_(noise / math.sqrt(fan_in))
            else:
                param.copy_(0.5 * noise)
    return model.eval()


def reference_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    model = timm.create_model(MODEL, **{"num_classes": 0, "img_size": IMG, **kwargs})
    return randomize_(model, seed)


def timm_state_dict(seed: int = 0, **kwargs) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    reference = reference_vit(seed, **kwargs)
    return {key: value.clone() for key, value in reference.state_dict().items()}, reference


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(123))


def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images)


def save(checkpoint, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(checkpoint, str(path))
    else:
        torch.save(checkpoint, path)
    return path


def load(path: Path, **kwargs) -> LoadedModel:
    return load_model(MODEL, checkpoint=path, img_size=IMG, **kwargs)


# --- an independent post-norm forward (data2vec 2.0 / refined data2vec) ------------------------------------------

BLOCK_SHAPES = {
    "norm1.weight": (WIDTH,), "norm1.bias": (WIDTH,),
    "attn.qkv.weight": (3 * WIDTH, WIDTH), "attn.qkv.bias": (3 * WIDTH,),
    "attn.proj.weight": (WIDTH, WIDTH), "attn.proj.bias": (WIDTH,),
    "norm2.weight": (WIDTH,), "norm2.bias": (WIDTH,),
    "mlp.fc1.weight": (MLP_HIDDEN, WIDTH), "mlp.fc1.bias": (MLP_HIDDEN,),
    "mlp.fc2.weight": (WIDTH, MLP_HIDDEN), "mlp.fc2.bias": (WIDTH,),
}


def random_post_norm_weights(num_blocks: int, seed: int) -> dict:
    """Weights of a post-norm encoder under neutral names; blocks use timm/fairseq block names."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    def block() -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in BLOCK_SHAPES.items():
            if "norm" in name and name.endswith("weight"):
                out[name] = 1 + rand(*shape, scale=0.2)
            elif len(shape) == 2:
                out[name] = rand(*shape, scale=shape[1] ** -0.5)
            else:
                out[name] = rand(*shape, scale=0.1)
        return out

    num_patches = (IMG // PATCH) ** 2
    return {
        "cls": rand(1, 1, WIDTH),
        "positions": rand(1, num_patches, WIDTH),
        "patch.weight": rand(WIDTH, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5),
        "patch.bias": rand(WIDTH),
        "embed_norm.weight": 1 + rand(WIDTH, scale=0.2),
        "embed_norm.bias": rand(WIDTH, scale=0.1),
        "blocks": [block() for _ in range(num_blocks)],
    }


def post_norm_forward(weights: dict, images: torch.Tensor) -> torch.Tensor:
    """data2vec 2.0's image encoder: patches (+bias) + positions, CLS prepended without a position, LayerNorm,
    then post-norm blocks ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))`` and no final norm.
    Output (batch, 1 + patches, width)."""
    x = F.conv2d(images, weights["patch.weight"], weights["patch.bias"], stride=PATCH)  # (B, D, H, W)
    x = x.flatten(2).transpose(1, 2) + weights["positions"]  # (B, H*W, D), row-major patches
    x = torch.cat([weights["cls"].expand(x.shape[0], -1, -1), x], dim=1)
    x = F.layer_norm(x, (WIDTH,), weights["embed_norm.weight"], weights["embed_norm.bias"], EPS)
    for block in weights["blocks"]:
        x = F.layer_norm(x + attention(x, block), (WIDTH,), block["norm1.weight"], block["norm1.bias"], EPS)
        hidden = F.gelu(F.linear(x, block["mlp.fc1.weight"], block["mlp.fc1.bias"]))
        x = F.layer_norm(x + F.linear(hidden, block["mlp.fc2.weight"], block["mlp.fc2.bias"]), (WIDTH,),
                         block["norm2.weight"], block["norm2.bias"], EPS)
    return x


def attention(x: torch.Tensor, block: dict[str, torch.Tensor]) -> torch.Tensor:
    batch, tokens, width = x.shape
    head_dim = width // HEADS
    qkv = F.linear(x, block["attn.qkv.weight"], block["attn.qkv.bias"])
    q, k, v = qkv.view(batch, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)  # (B, heads, N, N)
    out = (scores @ v).transpose(1, 2).reshape(batch, tokens, width)
    return F.linear(out, block["attn.proj.weight"], block["attn.proj.bias"])


def data2vec_checkpoint(weights: dict, *, num_prenet: int, position_name: str = "fixed_positional_encoder.positions",
                        prefix: str = "") -> dict:
    """A fairseq data2vec 2.0 image checkpoint: weights under ``model`` beside args/cfg/optimizer history."""
    model = {
        D2V + "extra_tokens": weights["cls"],
        D2V + "local_encoder.proj.weight": weights["patch.weight"],
        D2V + "local_encoder.proj.bias": weights["patch.bias"],
        D2V + position_name: weights["positions"],
        D2V + "context_encoder.norm.weight": weights["embed_norm.weight"],
        D2V + "context_encoder.norm.bias": weights["embed_norm.bias"],
        D2V + "decoder.blocks.0.0.weight": torch.randn(16, 16, 3),
        D2V + "decoder.blocks.0.0.bias": torch.randn(16),
        D2V + "decoder.proj.weight": torch.randn(WIDTH, 16),
    }
    for index, block in enumerate(weights["blocks"]):
        name = D2V + f"context_encoder.blocks.{index}" if index < num_prenet else f"blocks.{index - num_prenet}"
        model.update({f"{name}.{key}": value for key, value in block.items()})
    model = {prefix + key: value for key, value in model.items()}
    # fairseq keeps the EMA teacher as a nested dict with the same names: different weights that must not load
    model["_ema"] = {key: value + 1 for key, value in model.items()}
    return {
        "args": argparse.Namespace(arch="data2vec_multi", lr=[5e-4]),
        "cfg": {"model": {"_name": "data2vec_multi", "depth": DEPTH - num_prenet}, "task": {"_name": "mae_image"}},
        "model": model,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "CompositeOptimizer",
                               "num_updates": 1000}],
        "task_state": {},
        "extra_state": {"epoch": 3, "previous_best": None},
    }


# --- formats built from a reference timm model -------------------------------------------------------------------


def with_prefix(state_dict: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state_dict.items()}


PRE_NORM_FORMATS = {
    "plain": lambda sd: sd,
    "model-wrapper": lambda sd: {"model": sd, "epoch": 10, "args": argparse.Namespace(lr=1e-3)},
    "state_dict-wrapper": lambda sd: {"state_dict": sd, "epoch": 10},
    "ddp": lambda sd: {"model": with_prefix(sd, "module.")},
    "compiled": lambda sd: with_prefix(sd, "_orig_mod."),
    "ddp-compiled": lambda sd: {"state_dict": with_prefix(sd, "module._orig_mod.")},
}


@pytest.mark.parametrize("layout", sorted(PRE_NORM_FORMATS))
def test_timm_layouts_load_exactly(layout, tmp_path, images):
    state_dict, reference = timm_state_dict(seed=1)
    path = save(PRE_NORM_FORMATS[layout](state_dict), tmp_path / "checkpoint.pth")

    loaded = load(path)

    assert loaded.checkpoint_format == "timm"
    assert loaded.weights == "checkpoint"
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def test_safetensors_plain_state_dict(tmp_path, images):
    state_dict, reference = timm_state_dict(seed=2)
    path = save(state_dict, tmp_path / "weights.safetensors")

    loaded = load(path)

    assert loaded.checkpoint_format == "timm"
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def test_loaded_model_records_the_file_identity(tmp_path):
    state_dict, _ = timm_state_dict(seed=1)
    path = save(state_dict, tmp_path / "checkpoint.pth")

    loaded = load(path)

    assert loaded.checkpoint == str(path)
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.identity()["checkpoint_sha256"] == loaded.checkpoint_sha256
    assert not loaded.model.training


def dino_checkpoint(teacher: dict, student: dict) -> dict:
    """DINO's full training checkpoint: teacher ``backbone.*`` + projection ``head.*``, DDP-wrapped student."""
    dino_head = {
        "head.mlp.0.weight": torch.randn(128, WIDTH), "head.mlp.0.bias": torch.randn(128),
        "head.mlp.2.weight": torch.randn(32, 128), "head.mlp.2.bias": torch.randn(32),
        "head.last_layer.weight_g": torch.randn(256, 1), "head.last_layer.weight_v": torch.randn(256, 32),
    }
    return {
        "teacher": {**with_prefix(teacher, "backbone."), **dino_head},
        "student": {**with_prefix(student, "module.backbone."), **with_prefix(dino_head, "module.")},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 256)},
    }


def test_dino_full_checkpoint_loads_the_teacher_backbone(tmp_path, images):
    teacher, reference = timm_state_dict(seed=3)
    student, student_model = timm_state_dict(seed=4)
    path = save(dino_checkpoint(teacher, student), tmp_path / "dino.pth")

    loaded = load(path)

    assert loaded.checkpoint_format == "dino"
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))
    assert not torch.allclose(features(loaded.model, images), features(student_model, images))


def test_dino_student_only_loads_its_backbone(tmp_path, images):
    student, reference = timm_state_dict(seed=4)
    path = save({"module": with_prefix(student, "backbone.")}, tmp_path / "student.pth")

    torch.testing.assert_close(features(load(path).model, images), features(reference, images))


def mae_full_checkpoint(encoder: dict) -> dict:
    """The official MAE pre-training file: encoder + mask token and the whole decoder, under ``model``."""
    decoder_width = 32
    num_tokens = encoder["pos_embed"].shape[1]
    decoder_block = {f"decoder_blocks.0.{name}": torch.randn(*(s if s != WIDTH else decoder_width for s in shape))
                     for name, shape in {**BLOCK_SHAPES, "mlp.fc1.weight": (4 * WIDTH, WIDTH),
                                         "mlp.fc1.bias": (4 * WIDTH,), "mlp.fc2.weight": (WIDTH, 4 * WIDTH)}.items()}
    model = {
        **encoder,
        "mask_token": torch.randn(1, 1, decoder_width),  # 3-D: must not be taken for DINOv2's (1, D)
        "decoder_embed.weight": torch.randn(decoder_width, WIDTH),
        "decoder_embed.bias": torch.randn(decoder_width),
        "decoder_pos_embed": torch.randn(1, num_tokens, decoder_width),
        **decoder_block,
        "decoder_norm.weight": torch.randn(decoder_width),
        "decoder_norm.bias": torch.randn(decoder_width),
        "decoder_pred.weight": torch.randn(PATCH * PATCH * 3, decoder_width),
        "decoder_pred.bias": torch.randn(PATCH * PATCH * 3),
    }
    return {"model": model, "optimizer": {"state": {}}, "epoch": 799, "args": argparse.Namespace(norm_pix_loss=True)}


def mae_reference(seed: int) -> tuple[dict, torch.nn.Module]:
    state_dict, reference = timm_state_dict(seed=seed)
    with torch.no_grad():  # MAE stores a fixed pos_embed whose CLS row is all zeros
        reference.pos_embed[:, 0].zero_()
    state_dict["pos_embed"] = reference.pos_embed.detach().clone()
    return state_dict, reference


def test_mae_full_pretraining_checkpoint_drops_the_decoder(tmp_path, images):
    encoder, reference = mae_reference(seed=5)
    path = save(mae_full_checkpoint(encoder), tmp_path / "mae_pretrain_full.pth")

    loaded = load(path)

    assert loaded.checkpoint_format == "mae"
    assert any("decoder" in note for note in loaded.notes)
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def test_mae_full_checkpoint_as_flat_safetensors(tmp_path, images):
    # flat: nothing shields the top-level mask_token from timm's DINOv2 branch except mimprobe's own remap
    encoder, reference = mae_reference(seed=6)
    path = save(mae_full_checkpoint(encoder)["model"], tmp_path / "mae.safetensors")

    loaded = load(path)

    assert loaded.checkpoint_format == "mae"
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def test_dinov2_style_checkpoint_with_a_2d_mask_token(tmp_path, images):
    state_dict, reference = timm_state_dict(seed=7)
    path = save({**state_dict, "mask_token": torch.randn(1, WIDTH)}, tmp_path / "dinov2.pth")

    loaded = load(path)

    assert loaded.checkpoint_format == "dinov2"
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def test_mim_refiner_pre_norm_checkpoint(tmp_path, images):
    # MIM-Refiner adds positions to patches only: the matching timm model has no_embed_class=True
    state_dict, reference = timm_state_dict(seed=8, no_embed_class=True)
    grid = IMG // PATCH
    refiner = {key: value for key, value in state_dict.items() if key not in ("cls_token", "pos_embed")}
    refiner["cls_tokens.tokens"] = state_dict["cls_token"]
    refiner["pos_embed.embed"] = state_dict["pos_embed"].reshape(1, grid, grid, WIDTH)  # (1, H, W, D)
    checkpoint = {"state_dict": refiner, "ctor_kwargs": {"kind": "vit.prenorm_vit", "dim": WIDTH},
                  "ckpt": {"epoch": 20, "update": 1000}, "abs_ckpt": {"epoch": 20}, "stage_id": "abcd1234"}
    path = save(checkpoint, tmp_path / "mae_refined_l16.th")

    loaded = load(path)

    assert loaded.checkpoint_format == "mim-refiner"
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def test_mim_refiner_post_norm_checkpoint(tmp_path, images):
    weights = random_post_norm_weights(DEPTH, seed=9)
    grid = IMG // PATCH
    refiner = {
        "cls_tokens.tokens": weights["cls"],
        "pos_embed.embed": weights["positions"].reshape(1, grid, grid, WIDTH),
        "patch_embed.proj.weight": weights["patch.weight"],
        "patch_embed.proj.bias": weights["patch.bias"],
        "embed_norm.weight": weights["embed_norm.weight"],
        "embed_norm.bias": weights["embed_norm.bias"],
    }
    for index, block in enumerate(weights["blocks"]):
        refiner.update({f"blocks.{index}.{key}": value for key, value in block.items()})
    path = save({"state_dict": refiner, "stage_id": "d2v2refined"}, tmp_path / "d2v2_refined.th")

    loaded = load(path)

    assert loaded.checkpoint_format == "mim-refiner"
    assert loaded.model_kwargs["post_norm_blocks"] is True
    torch.testing.assert_close(features(loaded.model, images), post_norm_forward(weights, images))


@pytest.mark.parametrize("num_prenet", [0, 2])
@pytest.mark.parametrize("position_name", ["fixed_positional_encoder.positions", "positional_encoder.pos_embed"])
def test_data2vec2_checkpoint_matches_an_explicit_post_norm_forward(num_prenet, position_name, tmp_path, images):
    weights = random_post_norm_weights(DEPTH, seed=10 + num_prenet)
    checkpoint = data2vec_checkpoint(weights, num_prenet=num_prenet, position_name=position_name)
    path = save(checkpoint, tmp_path / "data2vec2.pt")

    loaded = load(path)

    assert loaded.checkpoint_format == "data2vec2"
    assert loaded.model_kwargs == {"pre_norm": True, "final_norm": False, "post_norm_blocks": True, "num_classes": 0}
    torch.testing.assert_close(features(loaded.model, images), post_norm_forward(weights, images))
    assert not torch.equal(loaded.model.cls_token, checkpoint["model"]["_ema"][D2V + "extra_tokens"])


def test_data2vec2_check_is_sensitive_to_block_order(images):
    """The explicit reference distinguishes prenet/main block order, so the offset test above can fail."""
    weights = random_post_norm_weights(DEPTH, seed=10)
    swapped = {**weights, "blocks": weights["blocks"][2:] + weights["blocks"][:2]}
    assert not torch.allclose(post_norm_forward(weights, images), post_norm_forward(swapped, images), atol=1e-3)


def test_post_norm_reference_agrees_with_a_timm_pre_norm_model_when_written_as_one(images):
    """Sanity check of the explicit reference's attention/MLP math: run it as a pre-norm ViT (by hand) and
    compare with timm."""
    reference = reference_vit(seed=11)
    sd = reference.state_dict()
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd["cls_token"].expand(2, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + sd["pos_embed"]
    for index in range(DEPTH):
        block = {key[len(f"blocks.{index}."):]: value for key, value in sd.items()
                 if key.startswith(f"blocks.{index}.")}
        x = x + attention(F.layer_norm(x, (WIDTH,), block["norm1.weight"], block["norm1.bias"], EPS), block)
        hidden = F.layer_norm(x, (WIDTH,), block["norm2.weight"], block["norm2.bias"], EPS)
        x = x + F.linear(F.gelu(F.linear(hidden, block["mlp.fc1.weight"], block["mlp.fc1.bias"])),
                         block["mlp.fc2.weight"], block["mlp.fc2.bias"])
    x = F.layer_norm(x, (WIDTH,), sd["norm.weight"], sd["norm.bias"], EPS)
    torch.testing.assert_close(x, features(reference, images))


def test_data2vec2_fine_tuned_checkpoint_with_head(tmp_path, images):
    weights = random_post_norm_weights(DEPTH, seed=12)
    checkpoint = data2vec_checkpoint(weights, num_prenet=0, prefix="model.")
    fc_norm = {"weight": 1 + 0.2 * torch.randn(WIDTH), "bias": 0.1 * torch.randn(WIDTH)}
    head = {"weight": torch.randn(10, WIDTH) / 8, "bias": torch.randn(10)}
    checkpoint["model"].update({"fc_norm.weight": fc_norm["weight"], "fc_norm.bias": fc_norm["bias"],
                                "head.weight": head["weight"], "head.bias": head["bias"]})
    path = save(checkpoint, tmp_path / "data2vec2_ft.pt")

    loaded = load(path)

    assert loaded.checkpoint_format == "data2vec2"
    expected = post_norm_forward(weights, images)
    torch.testing.assert_close(features(loaded.model, images), expected)
    pooled = F.layer_norm(expected[:, 1:].mean(dim=1), (WIDTH,), fc_norm["weight"], fc_norm["bias"], EPS)
    with torch.no_grad():
        logits = loaded.model(images)
    torch.testing.assert_close(logits, F.linear(pooled, head["weight"], head["bias"]))


# --- wrong architectures -----------------------------------------------------------------------------------------


def test_checkpoint_with_missing_and_extra_blocks_names_the_keys(tmp_path):
    state_dict, _ = timm_state_dict(seed=13)
    for key in [key for key in state_dict if key.startswith("blocks.5.")]:
        state_dict[key.replace("blocks.5.", "blocks.7.")] = state_dict.pop(key)
    path = save({"model": state_dict}, tmp_path / "deeper.pth")

    with pytest.raises(CheckpointError) as raised:
        load(path)

    message = str(raised.value)
    assert "12 missing keys" in message and "blocks.5.norm1.weight" in message
    assert "12 unexpected keys" in message and "blocks.7.norm1.weight" in message
    assert "\n" not in message


def test_checkpoint_of_a_wider_vit_fails_with_shape_mismatches(tmp_path):
    wider = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=IMG)  # width 192, 12 blocks
    path = save(wider.state_dict(), tmp_path / "vit_tiny.pth")

    with pytest.raises(CheckpointError) as raised:
        load(path)

    message = str(raised.value)
    assert "unexpected keys" in message and "blocks.6." in message
    assert "shape mismatches" in message and "vs (64," in message
    assert MODEL in message


def test_checkpoint_with_a_classifier_head_is_not_silently_dropped(tmp_path, images):
    # the head's size is read from the file: the model is built with it, and forward_features is unchanged
    state_dict, reference = timm_state_dict(seed=14)
    state_dict["head.weight"] = torch.randn(7, WIDTH)
    state_dict["head.bias"] = torch.randn(7)
    loaded = load(save(state_dict, tmp_path / "finetuned.pth"))

    assert loaded.model_kwargs["num_classes"] == 7
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images),
                                   F.linear(features(reference, images)[:, 0], state_dict["head.weight"],
                                            state_dict["head.bias"]))


def test_checkpoint_and_pretrained_are_exclusive(tmp_path):
    state_dict, _ = timm_state_dict(seed=1)
    path = save(state_dict, tmp_path / "checkpoint.pth")
    with pytest.raises(BadInputError, match="not both"):
        load_model(MODEL, checkpoint=path, pretrained=True)


# --- pretrained weights ------------------------------------------------------------------------------------------


def test_pretrained_file_loads_exactly_those_weights(tmp_path, images):
    # a local stand-in for timm's hub file, which for test_vit carries a 1000-class head
    state_dict, reference = timm_state_dict(seed=15, num_classes=1000)
    path = save(state_dict, tmp_path / "pretrained.pth")

    loaded = load_model(MODEL, pretrained_file=path, img_size=IMG)

    assert loaded.weights == "pretrained"
    assert loaded.model_kwargs == {"num_classes": 0}
    assert isinstance(loaded.model.head, torch.nn.Identity)
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def test_pretrained_file_is_loaded_strictly(tmp_path):
    # timm alone loads pretrained files non-strictly once the head is dropped: a missing block would stay random
    state_dict, _ = timm_state_dict(seed=15, num_classes=1000)
    for key in [key for key in state_dict if key.startswith("blocks.5.")]:
        del state_dict[key]
    state_dict["extra.weight"] = torch.zeros(3)
    path = save(state_dict, tmp_path / "partial.pth")

    with pytest.raises(CheckpointError) as raised:
        load_model(MODEL, pretrained_file=path, img_size=IMG)

    assert "blocks.5.norm1.weight" in str(raised.value) and "extra.weight" in str(raised.value)


def test_missing_pretrained_file_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_model(MODEL, pretrained_file=tmp_path / "absent.pth")


def test_pretrained_download_without_network_raises_download_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time, so the environment alone does not reach it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    with pytest.raises(DownloadError, match="vit_tiny_patch16_224.augreg_in21k") as raised:
        load_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True, img_size=IMG)

    assert "--checkpoint" in str(raised.value)


def test_random_weights_are_seeded(images):
    first = load_model(MODEL, img_size=IMG, init_seed=3)
    again = load_model(MODEL, img_size=IMG, init_seed=3)
    other = load_model(MODEL, img_size=IMG, init_seed=4)

    assert first.weights == "random" and first.identity()["init_seed"] == 3
    torch.testing.assert_close(features(first.model, images), features(again.model, images))
    assert not torch.allclose(features(first.model, images), features(other.model, images))


# --- names and structure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, suggestion", [("vit_tiny_patch16_22", "vit_tiny_patch16_224"),
                                              ("test_vitt", "test_vit"),
                                              ("vit_smol_patch16_224.augreg_in21k", "vit_small_patch16_224")])
def test_unknown_model_name_suggests_close_names(name, suggestion):
    with pytest.raises(BadInputError, match="did you mean") as raised:
        load_model(name)
    assert suggestion in str(raised.value)


def test_model_without_blocks_is_refused():
    with pytest.raises(BadInputError, match="no transformer blocks"):
        load_model("resnet10t")


@pytest.mark.parametrize("kwargs, prefix_tokens, reg_tokens, class_token", [
    ({}, 1, 0, True),
    ({"reg_tokens": 4}, 5, 4, True),
    ({"class_token": False, "global_pool": "avg"}, 0, 0, False),
])
def test_describe_model_counts_prefix_tokens(kwargs, prefix_tokens, reg_tokens, class_token, images):
    model = timm.create_model(MODEL, num_classes=0, img_size=IMG, **kwargs).eval()

    description = describe_model(model)

    assert description["num_prefix_tokens"] == prefix_tokens
    assert description["num_reg_tokens"] == reg_tokens
    assert description["has_class_token"] is class_token
    assert description["num_blocks"] == DEPTH
    assert description["embed_dim"] == WIDTH
    assert description["patch_size"] == [PATCH, PATCH]
    assert description["grid_size"] == [IMG // PATCH, IMG // PATCH]
    assert description["num_params"] == sum(p.numel() for p in model.parameters())
    # the count must agree with the tokens the model actually emits
    assert features(model, images).shape[1] == prefix_tokens + (IMG // PATCH) ** 2


def test_describe_post_norm_model_has_no_final_norm(tmp_path):
    weights = random_post_norm_weights(DEPTH, seed=16)
    loaded = load(save(data2vec_checkpoint(weights, num_prenet=2), tmp_path / "d2v.pt"))

    description = describe_model(loaded.model)

    assert description["final_norm"] is None and description["final_norm_on"] is None
    assert description["num_prefix_tokens"] == 1
    from mimprobe.features import BlockOutputs

    with pytest.raises(BadInputError, match="ends without a norm"):
        BlockOutputs(loaded.model, [DEPTH - 1], norm="final")


def test_checkpoint_with_another_patch_size_is_refused(tmp_path):
    """timm's filter would resample a patch-8 embedding to patch 16 and load 'strictly': mimprobe refuses."""
    import timm
    from safetensors.torch import save_file

    from mimprobe.errors import CheckpointError
    from mimprobe.models import load_model

    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)
    path = tmp_path / "patch8.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"patch size is \(8, 8\)"):
        load_model("vit_tiny_patch16_224", checkpoint=path, img_size=32)


# --- release files as published ----------------------------------------------------------------------------------


def test_fairseq_data2vec2_file_with_omegaconf_cfg_and_numpy_scalars(tmp_path, images):
    """fairseq writes cfg as an omegaconf DictConfig and numpy scalars in the optimizer history: the weights-only
    loader refuses such files; they load, and the omegaconf object becomes an inert placeholder."""
    omegaconf = pytest.importorskip("omegaconf")
    import numpy as np

    weights = random_post_norm_weights(DEPTH, seed=21)
    checkpoint = data2vec_checkpoint(weights, num_prenet=2)
    checkpoint["cfg"] = omegaconf.OmegaConf.create(checkpoint["cfg"])
    checkpoint["optimizer_history"][0]["num_updates"] = np.int64(1000)
    checkpoint["extra_state"]["best"] = np.float64(0.75)
    path = save(checkpoint, tmp_path / "data2vec2_fairseq.pt")
    from mimprobe.models.checkpoint_io import SAFE_GLOBALS

    with pytest.raises(Exception, match="DictConfig"), torch.serialization.safe_globals(SAFE_GLOBALS):
        torch.load(path, weights_only=True)  # the refusal this replaces

    loaded = load(path)

    assert loaded.checkpoint_format == "data2vec2"
    assert any("omegaconf.dictconfig.DictConfig" in note for note in loaded.notes)
    torch.testing.assert_close(features(loaded.model, images), post_norm_forward(weights, images))


def chunked(state_dict: dict, chunks: int) -> dict:
    """DINOv2's block_chunks layout: chunk c holds blocks c*n/chunks.. under their global index."""
    per_chunk = DEPTH // chunks
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            key = f"blocks.{int(index) // per_chunk}.{index}.{rest}"
        out[key] = value
    return out


@pytest.mark.parametrize("layout", ["teacher_checkpoint", "fvcore_model"])
def test_dinov2_training_checkpoint_with_block_chunks(layout, tmp_path, images):
    teacher, reference = timm_state_dict(seed=22)
    student, _ = timm_state_dict(seed=23)
    teacher = {**chunked(teacher, 3), "mask_token": torch.zeros(1, WIDTH)}
    student = {**chunked(student, 3), "mask_token": torch.zeros(1, WIDTH)}
    heads = {"dino_head.mlp.0.weight": torch.randn(32, WIDTH), "ibot_head.mlp.0.weight": torch.randn(32, WIDTH)}
    if layout == "teacher_checkpoint":  # eval/training_N/teacher_checkpoint.pth
        checkpoint = {"teacher": {**with_prefix(teacher, "backbone."), **heads}}
    else:  # model_N.pth from fvcore's Checkpointer: both networks under "model"
        checkpoint = {"model": {**with_prefix({**with_prefix(teacher, "backbone."), **heads}, "teacher."),
                                **with_prefix({**with_prefix(student, "backbone."), **heads}, "student.")},
                      "optimizer": {}, "iteration": 1250}
    path = save(checkpoint, tmp_path / "dinov2.pth")
    assert "blocks.0.0.norm1.weight" in teacher and "blocks.1.3.norm1.weight" in teacher

    loaded = load(path)

    assert loaded.checkpoint_format == "dinov2"
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))


def ijepa_checkpoint(target: dict, context: dict) -> dict:
    """I-JEPA's save_checkpoint: encoder, predictor, target_encoder (DDP module. names), opt, scaler, epoch, ..."""
    return {"encoder": with_prefix(context, "module."), "predictor": {"module.predictor_embed.weight":
                                                                      torch.randn(32, WIDTH)},
            "target_encoder": with_prefix(target, "module."), "opt": {"state": {}}, "scaler": None, "epoch": 300,
            "loss": 0.2, "batch_size": 2048, "world_size": 16, "lr": 0.001}


GAP = {"class_token": False, "global_pool": "avg", "fc_norm": False}


def test_ijepa_into_a_model_with_a_cls_token_names_the_model_to_use(tmp_path):
    target, _ = timm_state_dict(seed=24, **GAP)
    path = save(ijepa_checkpoint(target, target), tmp_path / "IN1K-vit.h.14-300e.pth.tar")

    with pytest.raises(CheckpointError, match="I-JEPA checkpoint has no CLS token") as raised:
        load(path)
    assert "class_token=false,global_pool=avg" in str(raised.value)
    with pytest.raises(CheckpointError, match="use vit_huge_patch14_gap_224"):
        # the real file's model: a ViT-H/14 with a CLS token; the check runs before any weight is compared
        load_model("vit_huge_patch14_224", checkpoint=path, model_kwargs={"depth": 1, "embed_dim": 64,
                                                                          "num_heads": 2, "img_size": 28})


def test_ijepa_loads_the_target_encoder_into_a_model_without_cls(tmp_path, images):
    target, reference = timm_state_dict(seed=24, **GAP)
    context, context_model = timm_state_dict(seed=25, **GAP)
    path = save(ijepa_checkpoint(target, context), tmp_path / "ijepa.pth.tar")

    loaded = load(path, model_kwargs=GAP)

    assert loaded.checkpoint_format == "ijepa"
    assert any("target encoder" in note for note in loaded.notes)
    torch.testing.assert_close(features(loaded.model, images), features(reference, images))
    assert not torch.allclose(features(loaded.model, images), features(context_model, images))


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "hub unreachable"])
def test_cli_pretrained_offline_is_exit_2_in_one_line_with_nothing_written(tmp_path, monkeypatch, how):
    """`--pretrained` without network (offline mode, or a hub that does not answer) and an empty cache: exit code
    2, one line naming the model, the cache and --checkpoint, and no feature store."""
    from typer.testing import CliRunner

    from mimprobe.cli import app
    from mimprobe.models import loading

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)

    result = CliRunner().invoke(app, ["extract", "vit_tiny_patch16_224.augreg_in21k",
                                      "synthetic:classes=2,train=2,test=1,size=8", "--pretrained", "--img-size", "32",
                                      "--out", str(tmp_path / "features")])

    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: could not fetch pretrained weights for vit_tiny_patch16_224.augreg_in21k")
    assert str(tmp_path / "hub-cache") in line and "--checkpoint FILE" in line
    assert not (tmp_path / "features").exists()
    assert huggingface_hub.constants.HF_HUB_OFFLINE is (how == "HF_HUB_OFFLINE")  # restored
