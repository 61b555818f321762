"""Hierarchical MIM families: ConvNeXt V2 (FCMAE) and Swin (SimMIM), every block of every stage.

Each official pre-training checkpoint is written here in its published layout FROM a seeded timm model's weights
(facebookresearch/ConvNeXt-V2 ``models/fcmae.py`` with its MinkowskiEngine encoder; microsoft/SimMIM
``models/simmim.py`` with the original Swin names), its decoder and mask token beside. The file is then extracted
through the CLI, and every block's stored vector must equal a forward hook's global average of that block's
output in a plain forward pass of the timm model the weights came from. The sparse FCMAE kernels are laid out
element by element (offset ``k = x * K + y``, the order the official ``remap_checkpoint_keys`` reads), not by
inverting mimprobe's reshape.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn as nn
from typer.testing import CliRunner

from mimprobe import load_data
from mimprobe.cli import app
from mimprobe.data import SplitDataset, build_eval_transform
from mimprobe.models.preprocessing import resolve_eval_data_config
from mimprobe.errors import BadInputError, CheckpointError
from mimprobe.features import FeatureStore
from mimprobe.models import describe_model, load_model

DATA = "synthetic:classes=3,train=4,test=2,size=24"  # 12 train images
SWIN_TINY = {"depths": [1, 1, 2, 1], "embed_dim": 32, "num_heads": [1, 2, 2, 4], "window_size": 4}
# family: (timm name, input size, architecture kwargs, stages attribute, block output channels last)
FAMILIES = {
    "fcmae": ("convnextv2_atto", 32, {}, "stages", False),
    "simmim": ("swin_tiny_patch4_window7_224", 64, SWIN_TINY, "layers", True),
}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinctive random values in every parameter (timm's init leaves norms at 1/0 and GRN at 0, which would
    hide swapped or dropped tensors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and "relative_position_bias_table" not in name:
                param.copy_(noise / math.sqrt(math.prod(param.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.5 * noise)
    return model.eval()


def reference_model(family: str) -> nn.Module:
    name, img_size, kwargs, _, _ = FAMILIES[family]
    size = {"img_size": img_size} if family == "simmim" else {}
    return randomize_(timm.create_model(name, num_classes=0, **kwargs, **size))


def sparse_kernel(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """A dense (out, in, K, K) convolution weight as MinkowskiEngine stores it: (K*K, in, out), or (K*K, out) for
    a depthwise one, offset ``k = x * K + y`` holding ``weight[..., y, x]``."""
    out_dim, in_dim, size, _ = weight.shape
    kernel = torch.empty(size * size, out_dim) if depthwise else torch.empty(size * size, in_dim, out_dim)
    for y in range(size):
        for x in range(size):
            kernel[x * size + y] = weight[:, 0, y, x] if depthwise else weight[:, :, y, x].T
    return kernel


def fcmae_checkpoint(model: nn.Module) -> dict:
    """The FCMAE training file of ``model``'s weights: ``{"model": FCMAE.state_dict(), "epoch": ...}``."""
    official = {}
    for key, value in model.state_dict().items():
        if key.startswith("head."):  # the sparse encoder has no final norm and no head
            continue
        parts = key.split(".")
        if parts[0] == "stem":  # Conv2d and a channels-first LayerNorm, dense in the sparse encoder too
            official[f"downsample_layers.0.{parts[1]}.{parts[2]}"] = value
        elif parts[2] == "downsample":  # MinkowskiLayerNorm, MinkowskiConvolution
            prefix = f"downsample_layers.{parts[1]}.{parts[3]}"
            if parts[3] == "0":
                official[f"{prefix}.ln.{parts[4]}"] = value
            elif parts[4] == "weight":
                official[f"{prefix}.kernel"] = sparse_kernel(value, depthwise=False)
            else:
                official[f"{prefix}.bias"] = value.reshape(1, -1)
        else:  # stages.S.blocks.J.<layer>
            prefix = f"stages.{parts[1]}.{parts[3]}"
            layer, leaf = ".".join(parts[4:-1]), parts[-1]
            if layer == "conv_dw":
                official[f"{prefix}.dwconv.{'kernel' if leaf == 'weight' else 'bias'}"] = (
                    sparse_kernel(value, depthwise=True) if leaf == "weight" else value.reshape(1, -1))
            elif layer == "norm":
                official[f"{prefix}.norm.ln.{leaf}"] = value
            elif layer in ("mlp.fc1", "mlp.fc2"):
                linear = value.reshape(value.shape[0], -1) if leaf == "weight" else value  # 1x1 conv -> Linear
                official[f"{prefix}.pwconv{layer[-1]}.linear.{leaf}"] = linear
            elif layer == "mlp.grn":
                official[f"{prefix}.grn.{'gamma' if leaf == 'weight' else 'beta'}"] = value.reshape(1, -1)
            else:
                raise AssertionError(f"unexpected key {key}")
    decoder_dim, width = 8, model.num_features
    state_dict = {f"encoder.{key}": value for key, value in official.items()}
    state_dict.update({
        "proj.weight": torch.randn(decoder_dim, width, 1, 1), "proj.bias": torch.randn(decoder_dim),
        "mask_token": torch.zeros(1, decoder_dim, 1, 1),
        "decoder.0.dwconv.weight": torch.randn(decoder_dim, 1, 7, 7), "decoder.0.dwconv.bias": torch.randn(decoder_dim),
        "decoder.0.norm.weight": torch.ones(decoder_dim), "decoder.0.norm.bias": torch.zeros(decoder_dim),
        "decoder.0.pwconv1.weight": torch.randn(4 * decoder_dim, decoder_dim),
        "decoder.0.grn.gamma": torch.zeros(1, 1, 1, 4 * decoder_dim),
        "pred.weight": torch.randn(32 * 32 * 3, decoder_dim, 1, 1), "pred.bias": torch.randn(32 * 32 * 3),
    })
    return {"model": state_dict, "epoch": 799}


def simmim_checkpoint(model: nn.Module) -> dict:
    """The SimMIM training file of a Swin's weights: original Swin names (patch merging at the END of a stage, the
    ``relative_position_index``/``attn_mask`` buffers saved) under ``encoder.``, with the mask token and decoder."""
    state_dict = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":  # timm merges at the start of the next stage
            key = ".".join(["layers", str(int(parts[1]) - 1), *parts[2:]])
        state_dict[f"encoder.{key}"] = value
        if key.endswith("attn.relative_position_bias_table"):
            window = model.get_submodule(key.rsplit(".", 1)[0]).window_size
            buffers = key.replace("attn.relative_position_bias_table", "")
            state_dict[f"encoder.{buffers}attn.relative_position_index"] = torch.zeros(
                window[0] ** 2, window[1] ** 2, dtype=torch.long)
            state_dict[f"encoder.{buffers}attn_mask"] = torch.zeros(4, window[0] ** 2, window[1] ** 2)
    width = model.num_features
    state_dict.update({"encoder.mask_token": torch.randn(1, 1, model.embed_dim),
                       "decoder.0.weight": torch.randn(32 * 32 * 3, width, 1, 1),
                       "decoder.0.bias": torch.randn(32 * 32 * 3)})
    return {"model": state_dict, "epoch": 799}


def hooked_block_means(model: nn.Module, images: torch.Tensor, stages_attribute: str,
                       channels_last: bool) -> list[torch.Tensor]:
    """Every block's output of every stage, in forward order, averaged over the map: (batch, width) each."""
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
               for stage in getattr(model, stages_attribute) for block in stage.blocks]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [output.mean(dim=(1, 2) if channels_last else (2, 3)) for output in outputs]


def _images(model: nn.Module, img_size: int) -> torch.Tensor:
    transform = build_eval_transform(resolve_eval_data_config(model, img_size=img_size))
    dataset = SplitDataset(load_data(DATA).splits["train"], transform, (3, img_size, img_size))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _cli_extract(tmp_path, family: str, checkpoint) -> FeatureStore:
    name, img_size, kwargs, _, _ = FAMILIES[family]
    args = ["extract", name, DATA, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "features"),
            "--img-size", str(img_size), "--pool", "mean", "--store-dtype", "float32", "--batch-size", "12", "--json"]
    if kwargs:
        args += ["--model-kwargs", json.dumps(kwargs)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return FeatureStore.open(json.loads(result.stdout)["store"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_official_checkpoint_loads_strictly_and_every_block_equals_a_forward_hook(family, tmp_path):
    name, img_size, kwargs, stages_attribute, channels_last = FAMILIES[family]
    reference = reference_model(family)
    path = tmp_path / f"{family}.pth"
    torch.save(fcmae_checkpoint(reference) if family == "fcmae" else simmim_checkpoint(reference), path)

    loaded = load_model(name, checkpoint=path, img_size=img_size, model_kwargs=kwargs)
    assert loaded.checkpoint_format == family
    assert loaded.preprocessing.source.startswith("ConvNeXt V2" if family == "fcmae" else "SimMIM")
    expected = {key: value for key, value in reference.state_dict().items()
                if not (family == "fcmae" and key.startswith("head.norm."))}  # FCMAE has no final norm
    loaded_state = loaded.model.state_dict()
    assert loaded_state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded_state[key], value), key

    store = _cli_extract(tmp_path, family, path)
    structure = store.manifest["model"]["structure"]
    references = hooked_block_means(reference, _images(reference, img_size), stages_attribute, channels_last)
    assert store.manifest["model"]["checkpoint_format"] == family
    assert store.blocks == list(range(len(references))) == list(range(structure["num_blocks"]))
    assert structure["block_modules"] == [f"{stages_attribute}.{s}.blocks.{j}" for s, stage
                                          in enumerate(getattr(reference, stages_attribute))
                                          for j in range(len(stage.blocks))]
    for block, pooled in enumerate(references):
        stored = torch.from_numpy(store.features("train", block, "mean").copy())
        assert stored.shape == pooled.shape == (12, structure["block_widths"][block])
        torch.testing.assert_close(stored, pooled, rtol=1e-5, atol=1e-5, msg=f"block {block}")


def test_fcmae_encoder_ends_without_a_norm(tmp_path):
    """FCMAE's sparse encoder has no final norm: timm's ``head.norm`` is removed (not left at its init, which
    ``--norm final`` would apply), so ``--norm final`` is refused."""
    path = tmp_path / "fcmae.pth"
    torch.save(fcmae_checkpoint(reference_model("fcmae")), path)
    loaded = load_model("convnextv2_atto", checkpoint=path)
    assert isinstance(loaded.model.head.norm, nn.Identity)
    assert describe_model(loaded.model)["final_norm"] is None
    from mimprobe import extract

    out = tmp_path / "features"
    with pytest.raises(BadInputError, match="ends without a norm"):
        extract(loaded, DATA, out=out, pool=("mean",), norm="final", img_size=32, progress=False)
    assert not out.exists()


def test_timm_fcmae_weights_lose_the_head_norm_timm_leaves_at_its_init(tmp_path):
    """timm loads its ``.fcmae`` weights non-strictly because they have no ``head.norm``: mimprobe removes that norm
    instead of leaving it at its initialisation (here from a local file in timm's names, as the hub holds them)."""
    from safetensors.torch import save_file

    reference = reference_model("fcmae")
    path = tmp_path / "fcmae.safetensors"
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()
               if not key.startswith("head.")}, str(path))
    loaded = load_model("convnextv2_atto.fcmae", pretrained_file=path)
    assert isinstance(loaded.model.head.norm, nn.Identity)
    loaded_state = loaded.model.state_dict()
    assert all(torch.equal(loaded_state[key], value) for key, value in reference.state_dict().items()
               if not key.startswith("head."))
    fine_tuned = load_model("convnextv2_atto.fcmae_ft_in1k", pretrained_file=_with_head(reference, tmp_path))
    assert not isinstance(fine_tuned.model.head.norm, nn.Identity)


def _with_head(model: nn.Module, tmp_path) -> str:
    from safetensors.torch import save_file

    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    state.update({"head.fc.weight": torch.zeros(1000, model.num_features), "head.fc.bias": torch.zeros(1000)})
    path = tmp_path / "fcmae_ft_in1k.safetensors"
    save_file(state, str(path))
    return str(path)


def test_simmim_checkpoint_of_other_windows_is_refused_not_resampled(tmp_path):
    """timm's Swin filter resamples relative position tables of another window size without a word; SimMIM's
    192 px / 6x6-window files loaded into a 7x7-window name would give another model's features."""
    path = tmp_path / "simmim.pth"
    torch.save(simmim_checkpoint(reference_model("simmim")), path)
    with pytest.raises(CheckpointError, match=r"windows are 4x4 .*window_size=4") as raised:
        load_model("swin_tiny_patch4_window7_224", checkpoint=path, img_size=64,
                   model_kwargs={**SWIN_TINY, "window_size": 2})
    assert "\n" not in str(raised.value)


def test_convnext_takes_the_input_size_from_the_transform():
    """ConvNeXt has no img_size argument: --img-size sets the transform only (it used to be refused)."""
    loaded = load_model("convnextv2_atto", img_size=48)
    assert "img_size" not in loaded.model_kwargs
    data_config, _ = loaded.eval_data_config(img_size=48)
    assert tuple(data_config["input_size"]) == (3, 48, 48)
