"""Model families: every timm model with ``forward_intermediates`` is either profiled correctly or refused before
anything is written.

Each family is built small (random weights, a few blocks, tiny images) and extracted end to end into a float32
store; the stored last block is checked against timm's own computation of the model's pooled output
(``forward_head(forward_features(x), pre_logits=True)``: CLS after ``norm`` for token-pooled ViTs, ``fc_norm`` of
the patch mean for average-pooled BEiT/EVA/NaFlexViT, ``head.norm`` of the map mean for Hiera and ConvNeXt V2, the
map mean after ``norm`` for Swin), or, for models
that pool otherwise (SigLIP's attention pool, SAM's neck), against their final tokens or a forward hook.
"""

from __future__ import annotations

import pytest
import torch

from mimprobe import extract, load_data
from mimprobe.data import SplitDataset, build_eval_transform
from mimprobe.models.preprocessing import resolve_eval_data_config
from mimprobe.errors import BadInputError
from mimprobe.models import describe_model, load_model

SMALL = "synthetic:classes=3,train=4,test=2,size=16"
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
SWIN_TINY = {"depths": (1, 1, 2, 1), "embed_dim": 32, "num_heads": (1, 2, 2, 4), "window_size": 4}

# name: (img_size, timm kwargs, how the model pools its head, expected block widths)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", 32, {"depth": 2}, "cls", [192, 192]),
    "deit3": ("deit3_small_patch16_224", 32, TINY, "cls", [64, 64]),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", 28, TINY, "cls", [64, 64]),
    "clip": ("vit_base_patch16_clip_224", 32, TINY, "cls", [64, 64]),
    "siglip": ("vit_base_patch16_siglip_224", 32, TINY, "tokens", [64, 64]),
    "beit": ("beit_base_patch16_224", 32, TINY, "mean", [64, 64]),
    "eva02": ("eva02_tiny_patch14_224", 28, {"depth": 2}, "mean", [192, 192]),
    "samvit": ("samvit_base_patch16", 64, TINY, "hook", [64, 64]),
    "hiera": ("hiera_tiny_224", 64, {}, "mean", [96, 192, 192, 384, 384, 384, 384, 384, 384, 384, 768, 768]),
    "convnextv2": ("convnextv2_atto", 32, {}, "mean", [40, 40, 80, 80, 160, 160, 160, 160, 160, 160, 320, 320]),
    "swin": ("swin_tiny_patch4_window7_224", 64, SWIN_TINY, "mean", [32, 64, 128, 128, 256]),
    "naflexvit": ("naflexvit_base_patch16_gap", 32, TINY, "mean", [64, 64]),
    "vit-gap": ("vit_base_patch16_gap_224", 32, TINY, "mean", [64, 64]),
}


def _images(source, model, img_size: int, split: str = "train") -> torch.Tensor:
    transform = build_eval_transform(resolve_eval_data_config(model, img_size=img_size))
    dataset = SplitDataset(source.splits[split], transform, (3, img_size, img_size))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _last_block_hook(model, images: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = model.blocks[-1].register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    return captured["x"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_profiled_correctly(family, tmp_path):
    name, img_size, kwargs, head, widths = FAMILIES[family]
    loaded = load_model(name, img_size=img_size, model_kwargs=kwargs)
    structure = describe_model(loaded.model, name)
    assert structure["block_widths"] == widths
    last = len(widths) - 1
    poolings = ("cls", "mean") if structure["has_class_token"] else ("mean",)
    norm = "final" if structure["final_norm"] is not None else "raw"

    options = dict(pool=poolings, img_size=img_size, store_dtype="float32", batch_size=3, progress=False)

    store = extract(loaded, SMALL, out=tmp_path, norm="raw", **options).store
    assert store.complete
    for block, width in enumerate(widths):
        assert store.features("train", block, "mean").shape == (12, width)
    if norm == "final":  # the final norm fits the blocks of the final width (Hiera: its last stage)
        final_blocks = [block for block, width in enumerate(widths) if width == widths[-1]]
        store = extract(loaded, SMALL, out=tmp_path, norm="final", blocks=final_blocks, **options).store
    images = _images(load_data(SMALL), loaded.model, img_size)
    stored = torch.from_numpy(store.features("train", last, "cls" if head == "cls" else "mean").copy())
    with torch.inference_mode():
        if head in ("cls", "mean"):  # timm's own pooled output: CLS after norm, or (fc_)norm of the mean
            reference = loaded.model.forward_head(loaded.model.forward_features(images), pre_logits=True)
        elif head == "tokens":  # SigLIP pools with attention: the final tokens' patch mean instead
            reference = loaded.model.forward_features(images)[:, structure["num_prefix_tokens"]:].mean(1)
        else:  # SAM's neck is no norm (raw): the last block's (B, H, W, C) map averaged over H, W
            assert norm == "raw"
            reference = _last_block_hook(loaded.model, images).mean(dim=(1, 2))
    torch.testing.assert_close(stored, reference.float(), rtol=1e-4, atol=1e-4)


def test_norm_final_applies_fc_norm_of_average_pooled_models(tmp_path):
    """BEiT's norm is an Identity and its fc_norm acts after pooling: `--norm final` must change the features
    (it used to be a no-op) and equal fc_norm of the patch mean."""
    name, img_size, kwargs, _, _ = FAMILIES["beit"]
    loaded = load_model(name, img_size=img_size, model_kwargs=kwargs)
    with torch.no_grad():  # a non-trivial fc_norm, so that applying it is visible
        loaded.model.fc_norm.weight.uniform_(0.5, 2.0)
        loaded.model.fc_norm.bias.uniform_(-1.0, 1.0)
    options = dict(pool=("cls", "mean"), img_size=img_size, store_dtype="float32", progress=False)
    raw = extract(loaded, SMALL, out=tmp_path, norm="raw", **options).store
    final = extract(loaded, SMALL, out=tmp_path, norm="final", **options).store
    fc_norm = loaded.model.fc_norm
    for pooling in ("cls", "mean"):
        before = torch.from_numpy(raw.features("train", 1, pooling).copy())
        after = torch.from_numpy(final.features("train", 1, pooling).copy())
        with torch.no_grad():
            torch.testing.assert_close(after, fc_norm(before), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(after, before, atol=1e-2)


@pytest.mark.parametrize("name, options", [("resnet18", {}), ("resnet18", {"img_size": 32}), ("efficientnet_b0", {}),
                                           ("efficientnet_b0", {"img_size": 32}),
                                           ("swinv2_cr_tiny_ns_224", {})])
def test_cnn_and_staged_models_are_refused_before_anything_is_written(name, options, tmp_path):
    out = tmp_path / "features"
    with pytest.raises(BadInputError, match=r"not supported|no transformer blocks") as raised:
        extract(name, SMALL, out=out, pool=("mean",), progress=False, **options)
    assert "\n" not in str(raised.value)
    assert not out.exists() or not [path for path in out.iterdir() if not path.name.startswith(".")]


def test_norm_final_is_refused_for_a_model_that_ends_without_a_norm(tmp_path):
    name, img_size, kwargs, _, _ = FAMILIES["samvit"]
    out = tmp_path / "features"
    with pytest.raises(BadInputError, match="ends without a norm.*--norm raw"):
        extract(name, SMALL, out=out, pool=("mean",), norm="final", img_size=img_size, model_kwargs=kwargs,
                progress=False)
    assert not out.exists() or not [path for path in out.iterdir() if not path.name.startswith(".")]


def test_model_without_a_class_token_through_model_kwargs(tmp_path):
    loaded = load_model("test_vit", img_size=32, model_kwargs={"class_token": False, "global_pool": "avg",
                                                                "fc_norm": False})
    assert loaded.model_kwargs == {"num_classes": 0, "class_token": False, "global_pool": "avg", "fc_norm": False}
    assert describe_model(loaded.model)["has_class_token"] is False
    with pytest.raises(BadInputError, match="no CLS token: use --pool mean"):
        extract(loaded, SMALL, out=tmp_path, pool=("cls",), img_size=32, progress=False)
    store = extract(loaded, SMALL, out=tmp_path, pool=("mean",), norm="final", img_size=32,
                    store_dtype="float32", progress=False).store
    images = _images(load_data(SMALL), loaded.model, 32)
    with torch.inference_mode():
        reference = loaded.model.forward_head(loaded.model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(torch.from_numpy(store.features("train", 5, "mean").copy()), reference,
                               rtol=1e-4, atol=1e-4)


def test_model_kwargs_are_part_of_the_store_key(tmp_path):
    first = extract("test_vit", SMALL, out=tmp_path, pool=("mean",), img_size=32, progress=False)
    other = extract("test_vit", SMALL, out=tmp_path, pool=("mean",), img_size=32, progress=False,
                    model_kwargs={"depth": 3})
    assert first.store.key != other.store.key
    assert other.store.manifest["model"]["model_kwargs"]["depth"] == 3
    assert other.store.blocks == [0, 1, 2]


def test_unknown_model_kwarg_is_bad_input_before_any_store(tmp_path):
    out = tmp_path / "features"
    with pytest.raises(BadInputError, match="does not accept"):
        extract("test_vit", SMALL, out=out, pool=("mean",), img_size=32, progress=False,
                model_kwargs={"no_such_argument": 1})
    assert not out.exists() or not [path for path in out.iterdir() if not path.name.startswith(".")]


@pytest.mark.parametrize("text, expected", [
    ("class_token=false,global_pool=avg,depth=4", {"class_token": False, "global_pool": "avg", "depth": 4}),
    ('{"class_token": false, "mlp_ratio": 2.5}', {"class_token": False, "mlp_ratio": 2.5}),
    ("fc_norm=None, init_values=1e-5", {"fc_norm": None, "init_values": 1e-5}),
    ("", {}),
])
def test_parse_model_kwargs(text, expected):
    from mimprobe.choices import parse_model_kwargs

    assert parse_model_kwargs(text) == expected


@pytest.mark.parametrize("text", ["depth", "=3", "{not json", "[1, 2]", "1x=2"])
def test_parse_model_kwargs_refuses_other_forms(text):
    from mimprobe.choices import parse_model_kwargs

    with pytest.raises(BadInputError, match="--model-kwargs"):
        parse_model_kwargs(text)


def test_norm_final_on_an_early_hiera_stage_is_refused(tmp_path):
    name, img_size, kwargs, _, _ = FAMILIES["hiera"]
    with pytest.raises(BadInputError, match="fits only blocks 10-11"):
        extract(name, SMALL, out=tmp_path, pool=("mean",), norm="final", img_size=img_size, progress=False)


def test_hiera_blocks_are_taken_per_block_not_per_stage():
    """hiera_tiny has 12 blocks in stages of 1, 2, 7, 2 (widths 96..768); the spatial map halves per stage."""
    name, img_size, kwargs, _, widths = FAMILIES["hiera"]
    loaded = load_model(name, img_size=img_size, model_kwargs=kwargs)
    from mimprobe.features import BlockOutputs

    with torch.inference_mode():
        tokens = BlockOutputs(loaded.model, list(range(12)))(torch.randn(2, 3, img_size, img_size))
    assert [tokens[b].shape[-1] for b in range(12)] == widths
    assert [tokens[b].shape[1] for b in (0, 1, 3, 10)] == [256, 64, 16, 4]  # (64/4)^2, then /4 per stage


def test_info_of_a_refused_family_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from mimprobe.cli import app

    result = CliRunner().invoke(app, ["info", "efficientnet_b0"])
    assert result.exit_code == 2
    assert "not supported" in result.output and len(result.output.strip().splitlines()) == 1

