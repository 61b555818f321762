"""The detected checkpoint format sets the evaluation data config; overrides win; mimprobe's own exports keep the
data config they were trained with; extraction records the config and its source in the manifest and the key.

The references are the official evaluation transforms written out with torchvision (Resize(256, bicubic),
CenterCrop(224), ToTensor, Normalize(ImageNet)), applied to a non-square image and compared with the transform
mimprobe builds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

from mimprobe import extract
from mimprobe.data import build_eval_transform
from mimprobe.errors import BadInputError
from mimprobe.models import load_model

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
D2V = "modality_encoders.IMAGE."
SMALL = "synthetic:classes=3,train=4,test=2,size=16"


def official_eval(resize: int = 256, crop: int = 224) -> T.Compose:
    """The evaluation transform of MAE main_linprobe.py, DINO eval_knn.py, DINOv2 transforms.py and MIM-Refiner
    eval_knn_torchhub.py (all the same)."""
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
                      T.ToTensor(), T.Normalize(*IMAGENET)])


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    smooth = rng.random((30, 40, 3)).repeat(10, axis=0).repeat(10, axis=1)  # 300 x 400, blocky: resize matters
    return Image.fromarray((smooth * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: value.clone() for key, value in timm.create_model("test_vit", num_classes=0, img_size=224)
            .state_dict().items()}


def mae_encoder(weights):
    model = dict(weights)
    model["pos_embed"] = weights["pos_embed"].clone()
    model["pos_embed"][:, 0] = 0  # MAE's fixed sin-cos table keeps an all-zero CLS row
    return {"model": model}


def data2vec2(weights):
    blocks = {key: value for key, value in weights.items() if key.startswith("blocks.")}
    return {"model": {D2V + "extra_tokens": weights["cls_token"],
                      D2V + "local_encoder.proj.weight": weights["patch_embed.proj.weight"],
                      D2V + "local_encoder.proj.bias": weights["patch_embed.proj.bias"],
                      D2V + "fixed_positional_encoder.positions": weights["pos_embed"][:, 1:],
                      D2V + "context_encoder.norm.weight": torch.ones(64),
                      D2V + "context_encoder.norm.bias": torch.zeros(64), **blocks}}


def mim_refiner(weights):
    sd = {key: value for key, value in weights.items() if key not in ("cls_token", "pos_embed")}
    sd["cls_tokens.tokens"] = weights["cls_token"]
    sd["pos_embed.embed"] = weights["pos_embed"][:, 1:].reshape(1, 14, 14, 64)
    return {"state_dict": sd}


def dino_teacher(weights):
    return {"teacher": {"backbone." + key: value for key, value in weights.items()}, "epoch": 100}


def dinov2(weights):
    return {**weights, "mask_token": torch.zeros(1, 64)}


def ijepa(weights):
    encoder = {"module." + key: value for key, value in weights.items() if key != "cls_token"}
    encoder["module.pos_embed"] = weights["pos_embed"][:, 1:]
    return {"encoder": encoder, "target_encoder": encoder, "predictor": {"module.w": torch.zeros(2)}, "epoch": 1}


FORMATS = {"mae": (mae_encoder, "main_linprobe.py"), "data2vec2": (data2vec2, "mae_finetuning_image_dataset.py"),
           "mim-refiner": (mim_refiner, "eval_knn_torchhub.py"), "dino": (dino_teacher, "eval_knn.py"),
           "dinov2": (dinov2, "make_classification_eval_transform"), "ijepa": (ijepa, "ijepa src/transforms.py")}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_detected_format_sets_the_official_evaluation_transform(fmt, weights, photo, tmp_path):
    build, source_file = FORMATS[fmt]
    path = tmp_path / f"{fmt}.pth"
    torch.save(build(weights), path)
    kwargs = {"class_token": False, "global_pool": "avg", "fc_norm": False} if fmt == "ijepa" else {}

    loaded = load_model("test_vit", checkpoint=path, img_size=224, model_kwargs=kwargs)
    config, source = loaded.eval_data_config()

    assert loaded.checkpoint_format == fmt
    assert source_file in source
    assert config["input_size"] == [3, 224, 224] and config["mean"] == list(IMAGENET[0])
    torch.testing.assert_close(build_eval_transform(config)(photo), official_eval()(photo), rtol=0, atol=1e-5)


def test_timm_weights_keep_the_model_names_data_config(weights, photo, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(weights, path)

    loaded = load_model("test_vit", checkpoint=path, img_size=224)
    config, source = loaded.eval_data_config()

    assert loaded.checkpoint_format == "timm"
    assert "timm's data config of test_vit" in source
    assert config["mean"] == list(timm.create_model("test_vit").pretrained_cfg["mean"])


def test_data2vec2_above_224_px_resizes_without_crop(weights, photo, tmp_path):
    # fairseq's build_transform: crop_pct 224/256 up to 224 px, 1.0 above
    path = tmp_path / "d2v.pt"
    torch.save(data2vec2(weights), path)
    loaded = load_model("test_vit", checkpoint=path)  # built for test_vit's 160 px, then resampled
    assert loaded.eval_data_config()[0]["crop_pct"] == pytest.approx(224 / 256)
    large = load_model("test_vit", checkpoint=path, model_kwargs={"img_size": 256})
    config, _ = large.eval_data_config()
    assert config["input_size"] == [3, 256, 256] and config["crop_pct"] == 1.0
    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(256),
                           T.ToTensor(), T.Normalize(*IMAGENET)])
    torch.testing.assert_close(build_eval_transform(config)(photo), reference(photo), rtol=0, atol=1e-5)


def test_overrides_win_and_are_named(weights, photo, tmp_path):
    path = tmp_path / "mae.pth"
    torch.save(mae_encoder(weights), path)
    loaded = load_model("test_vit", checkpoint=path, img_size=224)

    config, source = loaded.eval_data_config(mean=[0.5], std=(0.25, 0.25, 0.25), interpolation="bilinear",
                                             crop_pct=0.5)

    assert (config["mean"], config["std"], config["interpolation"], config["crop_pct"]) == \
        ([0.5] * 3, [0.25] * 3, "bilinear", 0.5)
    assert source.endswith("overridden: --mean, --std, --interpolation, --crop-pct")
    reference = T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])
    torch.testing.assert_close(build_eval_transform(config)(photo), reference(photo), rtol=0, atol=1e-5)


@pytest.mark.parametrize("options, match", [({"crop_pct": 1.5}, "--crop-pct"), ({"crop_pct": 0}, "--crop-pct"),
                                            ({"std": [0.2, 0, 0.2]}, "--std"), ({"mean": [0.1, 0.2]}, "--mean"),
                                            ({"interpolation": "cubic"}, "--interpolation")])
def test_bad_overrides_are_bad_input(options, match):
    loaded = load_model("test_vit", img_size=32)
    with pytest.raises(BadInputError, match=match):
        loaded.eval_data_config(**options)


def test_a_data_config_recorded_by_mimprobe_wins_over_the_format(weights, tmp_path):
    recorded = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 0.9}
    pickle_path = tmp_path / "mae.pth"
    torch.save({**mae_encoder(weights), "data_config": recorded}, pickle_path)
    safetensors_path = tmp_path / "refined.safetensors"
    save_file({k: v.contiguous() for k, v in mae_encoder(weights)["model"].items()}, str(safetensors_path),
              metadata={"format": "timm", "data_config": json.dumps(recorded)})

    for path in (pickle_path, safetensors_path):
        loaded = load_model("test_vit", checkpoint=path, img_size=224)
        config, source = loaded.eval_data_config()
        assert loaded.checkpoint_format == "mae"
        assert config["mean"] == [0.5] * 3 and config["crop_pct"] == 0.9
        assert source.startswith("recorded in the checkpoint by mimprobe")


def test_extract_records_the_config_and_its_source_and_keys_on_them(weights, tmp_path):
    path = tmp_path / "mae.pth"
    torch.save(mae_encoder(weights), path)
    options = dict(pool=("cls",), img_size=32, progress=False)

    first = extract("test_vit", SMALL, out=tmp_path / "f", checkpoint=str(path), **options).store
    again = extract("test_vit", SMALL, out=tmp_path / "f", checkpoint=str(path), **options)
    other = extract("test_vit", SMALL, out=tmp_path / "f", checkpoint=str(path), mean=(0.5, 0.5, 0.5),
                    std=(0.5, 0.5, 0.5), **options).store

    manifest = first.manifest
    assert manifest["transform"]["mean"] == list(IMAGENET[0])
    assert manifest["transform_source"].startswith("MAE evaluation")
    assert manifest["key_fields"]["transform"] == manifest["transform"]
    assert again.reused and again.store.key == first.key
    assert other.key != first.key
    assert other.manifest["transform"]["mean"] == [0.5] * 3
    assert "overridden: --mean, --std" in other.manifest["transform_source"]
    assert not np.array_equal(first.features("train", 5, "cls"), other.features("train", 5, "cls"))


def test_real_images_get_the_official_transform(cifar_subset, weights, tmp_path):
    """On real JPEGs (CIFAR-10, 32 px, upsampled as the official code does), mimprobe's transform of a MAE file
    equals MAE's evaluation transform, and differs from timm's config of the name (mean/std 0.5, crop 0.9)."""
    path = tmp_path / "mae.pth"
    torch.save(mae_encoder(weights), path)
    loaded = load_model("test_vit", checkpoint=path, img_size=224)
    transform = build_eval_transform(loaded.eval_data_config()[0])
    files = sorted((cifar_subset / "test").rglob("*.jpg"))[::10][:10]
    assert len(files) == 10
    for file in files:
        with Image.open(file) as image:
            image = image.convert("RGB")
            ours, official = transform(image), official_eval()(image)
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)
    timm_config = build_eval_transform(load_model("test_vit", img_size=224).eval_data_config()[0])
    assert not torch.allclose(timm_config(image), official, atol=1e-2)
