"""Probe points inside each block (`--points`): each stored vector against hooks written here on the same images,
one forward pass per batch, the store key and resumption, and the refusal of blocks without such points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mimprobe import FeatureStore, extract, load_model
from mimprobe.choices import POINTS, parse_points
from mimprobe.data import SplitDataset, build_eval_transform, load_data
from mimprobe.errors import BadInputError
from mimprobe.features.config import ExtractConfig
from mimprobe.models.preprocessing import resolve_eval_data_config

DATA = "synthetic:classes=3,train=4,test=2,size=16"

# (timm name, img_size, model kwargs, prefix tokens: CLS + registers, poolings): a ViT with layer scale, a DINOv2
# ViT with 4 registers (prefix excluded from mean), BEiT and EVA-02 with gamma layer scale (EVA-02: SwiGLU MLP),
# and a gap ViT without a CLS token.
MODELS = {
    "vit-ls": ("vit_tiny_patch16_224", 32, dict(depth=2, embed_dim=32, num_heads=2, init_values=0.1), 1,
               ("cls", "mean")),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", 28, dict(depth=2, embed_dim=32, num_heads=2), 5,
                   ("cls", "mean")),
    "beit": ("beit_base_patch16_224", 32, dict(depth=2, embed_dim=32, num_heads=2, init_values=0.1), 1,
             ("cls", "mean")),
    "eva02": ("eva02_tiny_patch14_224", 28, dict(depth=2, embed_dim=32, num_heads=2, init_values=0.1), 1,
              ("cls", "mean")),
    "gap-vit": ("vit_tiny_patch16_224", 32, dict(depth=2, embed_dim=32, num_heads=2, global_pool="avg",
                                                 class_token=False, fc_norm=False), 0, ("mean",)),
}


def _images(loaded, source, split: str, img_size: int) -> torch.Tensor:
    transform = build_eval_transform(resolve_eval_data_config(loaded.model, img_size=img_size))
    dataset = SplitDataset(source.splits[split], transform, (3, img_size, img_size))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _reference_points(model: torch.nn.Module, images: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Every point's (batch, tokens, dim) tokens, derived here from the residual stream: a block's input x, its
    output y and norm2's input m (= x + attention branch) give attn = m - x and mlp = y - m; norm1 / norm2 are the
    norm modules' outputs; mlp_hidden is the activation recomputed from fc1's output (SwiGLU: act(gate) * value)."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for index, block in enumerate(model.blocks):
        def keep(name, index=index):
            def hook(_module, inputs, output=None):
                seen[(index, name)] = (inputs[0] if output is None else output).detach().clone()
            return hook
        handles += [block.register_forward_pre_hook(keep("in")), block.register_forward_hook(keep("out")),
                    block.norm1.register_forward_hook(keep("norm1")), block.norm2.register_forward_hook(keep("norm2")),
                    block.norm2.register_forward_pre_hook(keep("mid")), block.mlp.fc1.register_forward_hook(keep("fc1"))]
    try:
        with torch.inference_mode():
            model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    points = {}
    for index, block in enumerate(model.blocks):
        mlp = block.mlp
        fc1 = seen[(index, "fc1")]
        if hasattr(mlp, "gate_last"):  # timm GluMlp (EVA-02's SwiGLU): fc1 holds both halves
            first, second = fc1.chunk(2, dim=-1)
            hidden = first * mlp.act(second) if mlp.gate_last else mlp.act(first) * second
        else:
            hidden = mlp.act(fc1)
        points.update({(index, "norm1"): seen[(index, "norm1")], (index, "norm2"): seen[(index, "norm2")],
                       (index, "attn"): seen[(index, "mid")] - seen[(index, "in")],
                       (index, "mlp"): seen[(index, "out")] - seen[(index, "mid")],
                       (index, "mlp_hidden"): mlp.norm(hidden)})
    return points


def _pool(tokens: torch.Tensor, pooling: str, prefix: int) -> np.ndarray:
    pooled = tokens[:, 0] if pooling == "cls" else tokens[:, prefix:].mean(dim=1)
    return pooled.numpy()


@pytest.mark.parametrize("case", list(MODELS))
def test_every_point_equals_the_hooks_of_the_test_on_the_same_images(case, tmp_path):
    name, img_size, kwargs, prefix, poolings = MODELS[case]
    loaded = load_model(name, img_size=img_size, model_kwargs=kwargs)
    source = load_data(DATA)
    store = extract(loaded, source, out=tmp_path, img_size=img_size, points="all", pool=poolings,
                    store_dtype="float32", batch_size=5, progress=False).store
    assert store.points == list(POINTS)
    block_only = extract(loaded, source, out=tmp_path, img_size=img_size, pool=poolings, store_dtype="float32",
                         batch_size=5, progress=False).store
    assert block_only.path != store.path and block_only.points == ["block"]
    width = loaded.model.blocks[0].mlp.fc2.in_features
    for split in ("train", "test"):
        reference = _reference_points(loaded.model, _images(loaded, source, split, img_size))
        for block in store.blocks:
            for pooling in poolings:
                np.testing.assert_array_equal(store.features(split, block, pooling),
                                              block_only.features(split, block, pooling))  # point block: as today
                for point in POINTS[1:]:
                    stored = store.features(split, block, pooling, point=point)
                    assert stored.shape[1] == (width if point == "mlp_hidden" else kwargs["embed_dim"])
                    np.testing.assert_allclose(stored, _pool(reference[(block, point)], pooling, prefix),
                                               rtol=1e-4, atol=1e-5, err_msg=f"{case} {split} {block} {point}")


def test_layer_scale_is_inside_the_attention_point(tmp_path):
    """The attn point is the branch after layer scale: with init_values 1e-3 it is 1e-3 times the attention output."""
    loaded = load_model("vit_tiny_patch16_224", img_size=32, model_kwargs=dict(depth=1, embed_dim=32, num_heads=2,
                                                                                 init_values=1e-3))
    source = load_data(DATA)
    store = extract(loaded, source, out=tmp_path, img_size=32, points="attn", pool="mean", store_dtype="float32",
                    progress=False).store
    assert store.points == ["attn"]
    outputs = {}
    handle = loaded.model.blocks[0].attn.register_forward_hook(lambda m, i, o: outputs.setdefault("attn", o))
    with torch.inference_mode():
        loaded.model.forward_features(_images(loaded, source, "train", 32))
    handle.remove()
    np.testing.assert_allclose(store.features("train", 0, "mean", point="attn"),
                               1e-3 * outputs["attn"][:, 1:].mean(dim=1).numpy(), rtol=1e-4, atol=1e-8)


def test_all_points_come_from_one_forward_pass_per_batch(tmp_path):
    loaded = load_model("test_vit", img_size=32)
    calls = []
    loaded.model.patch_embed.register_forward_pre_hook(lambda module, inputs: calls.append(len(inputs[0])))
    source = load_data(DATA)  # 12 train + 6 test images: batches of 5 -> 3 + 2 forward passes
    extract(loaded, source, out=tmp_path / "block", img_size=32, batch_size=5, progress=False)
    block_calls, calls[:] = list(calls), []
    extract(loaded, source, out=tmp_path / "all", img_size=32, batch_size=5, points="all", progress=False)
    assert calls == block_calls == [1, 5, 5, 2, 5, 1]  # the blank-image check, then one pass per batch


def test_norm_final_applies_to_the_block_point_only(tmp_path):
    options = dict(out=tmp_path, img_size=32, points="block,attn,mlp_hidden", store_dtype="float32", progress=False)
    raw = extract("test_vit", DATA, norm="raw", **options).store
    final = extract("test_vit", DATA, norm="final", **options).store
    for point in ("attn", "mlp_hidden"):
        np.testing.assert_array_equal(raw.features("train", 5, point=point), final.features("train", 5, point=point))
    assert not np.allclose(raw.features("train", 5), final.features("train", 5))


def test_points_are_part_of_the_key_and_block_alone_keeps_the_old_key(tmp_path):
    options = dict(out=tmp_path, img_size=32, progress=False)
    block = extract("test_vit", DATA, **options).store
    assert "points" not in block.manifest["key_fields"]  # the key of stores made before points existed
    assert extract("test_vit", DATA, points="block", **options).reused
    both = extract("test_vit", DATA, points="mlp_hidden,block", **options).store
    assert both.key != block.key and both.manifest["points"] == ["block", "mlp_hidden"]
    assert extract("test_vit", DATA, points=["block", "mlp_hidden"], **options).reused  # order typed: same store
    assert (both.path / "train" / "block03_mlp_hidden_cls.npy").is_file()
    assert (both.path / "train" / "block03_cls.npy").is_file()


def test_a_manifest_without_points_reads_as_the_block_point(tmp_path):
    store = extract("test_vit", DATA, out=tmp_path, img_size=32, progress=False).store
    manifest = json.loads((store.path / "manifest.json").read_text())
    del manifest["points"], manifest["point_feature_dims"]  # as written before points existed
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    reopened = FeatureStore.open(store.path, verify=True)
    assert reopened.points == ["block"]
    np.testing.assert_array_equal(reopened.features("train", 2), store.features("train", 2))
    with pytest.raises(BadInputError, match="point 'attn' not in store .*--points attn"):
        reopened.features("train", 2, point="attn")


def test_resume_with_points_gives_the_bytes_of_an_uninterrupted_run(tmp_path):
    options = dict(img_size=32, batch_size=4, points="all", pool="cls,mean", progress=False)
    reference = extract("test_vit", DATA, out=tmp_path / "ref", **options).store

    def stop(split, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract("test_vit", DATA, out=tmp_path / "run", on_batch=stop, **options)
    resumed = extract("test_vit", DATA, out=tmp_path / "run", **options)
    assert resumed.resumed and resumed.images == 18 - 4
    files = sorted(p.relative_to(reference.path) for p in reference.path.rglob("*.npy"))
    assert len(files) == 2 * (1 + 6 * 6 * 2)  # per split: labels + 6 blocks x 6 points x 2 poolings
    for file in files + [Path("manifest.json")]:
        assert (resumed.store.path / file).read_bytes() == (reference.path / file).read_bytes(), file


@pytest.mark.parametrize("name, kwargs, kind", [
    ("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, pre_norm=True, final_norm=False, img_size=32),
     "PostNormBlock"),  # data2vec 2.0's post-norm blocks, as its checkpoints are loaded
    ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), "ConvNeXtBlock"),
])
def test_blocks_without_inner_points_are_refused_before_any_store(name, kwargs, kind, tmp_path):
    from mimprobe.models import LoadedModel
    from mimprobe.models.postnorm import PostNormBlock

    extra = {"block_fn": PostNormBlock} if kind == "PostNormBlock" else {}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs, **extra).eval()
    loaded = LoadedModel(model=model, name=name, weights="random")
    with pytest.raises(BadInputError, match=rf"--points attn: model {name} has blocks of type {kind} .*supports "
                                            r"--points block"):
        extract(loaded, DATA, out=tmp_path / "out", img_size=32, points="attn", pool="mean", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_points_option_text_and_list_forms():
    assert parse_points("attn,block") == ("block", "attn")
    assert parse_points("all") == POINTS
    assert ExtractConfig(points=("mlp", "norm1")).points == ("norm1", "mlp")
    with pytest.raises(BadInputError, match="unknown point 'ffn'"):
        parse_points("ffn,block")
