"""transformers checkpoints against transformers itself: every block's stored vector (through the CLI's store path)
equals the model's ``output_hidden_states`` on the same pixels; refusals write nothing; a pickle payload never runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mimprobe import FeatureStore, load_data
from mimprobe.cli import app
from mimprobe.data import SplitDataset, build_eval_transform
from mimprobe.errors import BadInputError, CheckpointError
from mimprobe.models import load_model
from mimprobe.models.transformers_format import preprocessing_from_processor_config

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
DATA = "synthetic:classes=2,train=3,test=2,size=32"
IMG = 32
# tiny and deliberately off the defaults: eps 1e-3 (transformers' ViT/BEiT use 1e-12, timm 1e-6), 3 blocks
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=IMG,
            patch_size=8, layer_norm_eps=1e-3)
# (config class, model class, config overrides, prefix tokens before the patches in hidden_states)
CASES = {
    "ViTMAEForPreTraining": ("ViTMAEConfig", "ViTMAEForPreTraining",
                             dict(qkv_bias=False, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                  decoder_num_attention_heads=2, decoder_intermediate_size=32), 1),
    "ViTMAEModel": ("ViTMAEConfig", "ViTMAEModel", {}, 1),
    "ViTModel": ("ViTConfig", "ViTModel", dict(qkv_bias=False), 1),
    "ViTForImageClassification": ("ViTConfig", "ViTForImageClassification",
                                  dict(num_labels=3, hidden_act="gelu_new"), 1),
    # config image 64 px, run at 32: transformers interpolates the position table at run time
    "Dinov2Model": ("Dinov2Config", "Dinov2Model", dict(mlp_ratio=2, qkv_bias=False, layerscale_value=0.5,
                                                        image_size=64), 1),
    "Dinov2Model-swiglu": ("Dinov2Config", "Dinov2Model", dict(use_swiglu_ffn=True, layerscale_value=0.5), 1),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                                 dict(mlp_ratio=2, num_register_tokens=3, layerscale_value=0.5), 1 + 3),
    "BeitModel": ("BeitConfig", "BeitModel", dict(use_relative_position_bias=True, layer_scale_init_value=0.2,
                                                  use_mean_pooling=True), 1),
    "BeitModel-v1-abs-pos": ("BeitConfig", "BeitModel", dict(use_absolute_position_embeddings=True,
                                                             use_shared_relative_position_bias=True,
                                                             layer_scale_init_value=0.0, use_mean_pooling=False), 1),
    "Data2VecVisionModel": ("Data2VecVisionConfig", "Data2VecVisionModel",
                            dict(use_shared_relative_position_bias=True, layer_scale_init_value=0.2), 1),
    "DeiTModel": ("DeiTConfig", "DeiTModel", dict(qkv_bias=False), 2),
}


def _save(folder: Path, case: str, seed: int = 0):
    """A tiny random transformers model (every weight moved off its init, so norms and layer scales matter),
    saved with save_pretrained; returns the model."""
    config_name, model_name, overrides, _ = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return model


def _encoder(model):
    for attribute in ("vit", "beit", "data2vec_vision", "deit", "dinov2"):
        if hasattr(model, attribute):
            return getattr(model, attribute)
    return model


def _hidden_states(model, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' own block outputs (hidden_states[i + 1] is block i's output, before the final norm)."""
    encoder = _encoder(model)
    kwargs = {}
    if type(encoder).__name__ == "ViTMAEModel":  # no masking, no shuffle: mask_ratio 0 and sorted noise
        encoder.config.mask_ratio = 0.0
        num_patches = encoder.embeddings.patch_embeddings.num_patches
        kwargs["noise"] = torch.arange(num_patches, dtype=torch.float32).expand(len(pixels), num_patches)
    with torch.no_grad():
        return encoder(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states


def _relative_error(ours: np.ndarray, reference: torch.Tensor) -> float:
    reference = reference.numpy()
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _store_pixels(store: FeatureStore, split: str) -> torch.Tensor:
    """The pixels the store was extracted from: the data's images through the store's recorded transform."""
    source = load_data(DATA)
    transform = build_eval_transform(store.manifest["transform"])
    dataset = SplitDataset(source.splits[split], transform, tuple(store.manifest["transform"]["input_size"]))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _extract(model_arg: str, out: Path, *extra: str) -> FeatureStore:
    result = runner.invoke(app, ["extract", model_arg, DATA, "--out", str(out), "--blocks", "all", "--pool",
                                 "cls,mean", "--store-dtype", "float32", "--img-size", str(IMG), "--no-progress",
                                 "--json", *extra])
    assert result.exit_code == 0, result.output
    return FeatureStore.open(json.loads(result.stdout)["store"])


@pytest.mark.parametrize("case", list(CASES))
def test_every_block_equals_transformers_hidden_states(tmp_path, case):
    model = _save(tmp_path / "model", case)
    store = _extract(str(tmp_path / "model"), tmp_path / "stores")
    prefix = CASES[case][3]
    assert store.blocks == [0, 1, 2]
    assert store.manifest["model"]["checkpoint_format"] == f"transformers {type(model).__name__}"
    for split in ("train", "test"):
        hidden = _hidden_states(model, _store_pixels(store, split))
        assert len(hidden) == 1 + 3
        for block in range(3):
            cls = _relative_error(store.features(split, block, "cls"), hidden[block + 1][:, 0])
            mean = _relative_error(store.features(split, block, "mean"), hidden[block + 1][:, prefix:].mean(1))
            assert cls <= 1e-5 and mean <= 1e-5, (case, split, block, cls, mean)


def test_sharded_safetensors_and_pickled_bin_load_the_same_weights(tmp_path):
    model = _save(tmp_path / "single", "BeitModel")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    # transformers 4.x wrote pickles (safe_serialization=False): a plain dict of tensors under the same names
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(load_file(str(tmp_path / "single" / "model.safetensors")), tmp_path / "pickled" / "pytorch_model.bin")
    states = [load_model(str(tmp_path / name), img_size=IMG).model.state_dict()
              for name in ("single", "sharded", "pickled")]
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for key in states[0]:
            torch.testing.assert_close(other[key], states[0][key], rtol=0, atol=0)


def test_timm_name_with_checkpoint_folder(tmp_path):
    model = _save(tmp_path / "model", "ViTModel")
    loaded = load_model("vit_small_patch16_224", checkpoint=tmp_path / "model", img_size=IMG)
    assert loaded.name == "vit_small_patch16_224" and loaded.model.embed_dim == 32
    pixels = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = loaded.model.forward_features(pixels)
        reference = _encoder(model)(pixel_values=pixels).last_hidden_state  # after the final layernorm
    assert _relative_error(ours.numpy(), reference) <= 1e-5
    with pytest.raises(BadInputError, match="another family"):
        load_model("beit_base_patch16_224", checkpoint=tmp_path / "model", img_size=IMG)


def test_preprocessor_config_is_the_eval_transform(tmp_path):
    _save(tmp_path / "model", "ViTModel")
    processor = transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                               image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3], resample=3)
    processor.save_pretrained(tmp_path / "model")
    result = runner.invoke(app, ["info", str(tmp_path / "model"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    config = info["data_config"]
    assert config["input_size"] == [3, 32, 32] and config["interpolation"] == "bicubic"
    assert config["mean"] == [0.4, 0.5, 0.6] and config["std"] == [0.2, 0.25, 0.3]
    assert "preprocessor_config.json" in info["data_config_source"]
    # the same pixels as transformers' own processor on a non-square image (resize shorter side 36, crop 32)
    rng = np.random.default_rng(0)
    from PIL import Image

    picture = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8))
    ours = build_eval_transform(config)(picture)
    theirs = processor(images=picture, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert float((ours - theirs).abs().max()) <= 0.02  # PIL vs transformers' resize: rounding of uint8 values
    squash = preprocessing_from_processor_config(json.loads(
        (Path(transformers.ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(tmp_path / "vit")[0])
         ).read_text()))
    assert squash.input_size == 48 and squash.preprocessing.crop_mode == "squash"
    assert squash.preprocessing.interpolation == "bilinear" and squash.preprocessing.crop_pct == 1.0


def test_crop_pct_gives_back_the_resize_size():
    for crop, resize in ((224, 256), (224, 232), (32, 36), (518, 592), (384, 438)):
        processor = {"size": {"shortest_edge": resize}, "crop_size": {"height": crop, "width": crop},
                     "do_center_crop": True}
        pct = preprocessing_from_processor_config(processor).preprocessing.crop_pct
        import math

        assert math.floor(crop / pct) == resize


def test_unsupported_class_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "swin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["SwinModel"], "model_type": "swin"}))
    out = tmp_path / "stores"
    result = runner.invoke(app, ["extract", str(folder), DATA, "--out", str(out)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "SwinModel" in result.stderr and "ViTMAEForPreTraining" in result.stderr and "Dinov2Model" in result.stderr
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["info", str(empty)])
    assert result.exit_code == 2 and "config.json" in result.stderr


def test_hub_id_offline_without_cache_exits_2_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 ...
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # ... with an empty HF_HOME
    out = tmp_path / "stores"
    result = runner.invoke(app, ["extract", "hf:facebook/vit-mae-base", DATA, "--out", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf:facebook/vit-mae-base" in lines[0] and "huggingface-cli download" in lines[0]
    assert not out.exists() and not (tmp_path / "empty-cache").exists()


@pytest.mark.slow
def test_hub_id_offline_in_a_fresh_process(tmp_path):
    """The same with the real environment variables, read by huggingface_hub at import (a subprocess: ~20 s)."""
    out = tmp_path / "stores"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-m", "mimprobe.cli", "extract", "hf:facebook/vit-mae-base", DATA,
                             "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf:facebook/vit-mae-base" in lines[0] and "huggingface-cli download" in lines[0]
    assert not out.exists()


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    model = _save(tmp_path / "snapshot", "Dinov2WithRegistersModel")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no reachability probe
    loaded = load_model("hf:someone/tiny-dinov2@v1", img_size=IMG)
    assert calls[0][0] == "someone/tiny-dinov2" and calls[0][1]["revision"] == "v1"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    assert loaded.checkpoint == "hf:someone/tiny-dinov2" + "@v1" and loaded.model.num_reg_tokens == 3
    pixels = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = loaded.model.forward_features(pixels)
        reference = model(pixel_values=pixels).last_hidden_state
    assert _relative_error(ours.numpy(), reference) <= 1e-5
    with pytest.raises(BadInputError, match="invalid hub id"):
        load_model("hf:no-slash", img_size=IMG)


class _Payload:
    """Unpickling this would create ``path`` (builtins.open(path, "w"))."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_pickle_payload_in_pytorch_model_bin_never_runs(tmp_path):
    _save(tmp_path / "model", "ViTModel")
    state = load_file(str(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**state, "payload": _Payload(marker)}, tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not tensors"):
        load_model(str(tmp_path / "model"), img_size=IMG)
    out = tmp_path / "stores"
    result = runner.invoke(app, ["extract", str(tmp_path / "model"), DATA, "--out", str(out), "--img-size", "32"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()
