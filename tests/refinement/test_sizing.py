"""A refinement sized for the machine: head widths in proportion to the model, local crops scaled to the input,
--head-dims parsing, ema_progress's definition, and the checkpoint size computed from the modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimprobe.errors import BadInputError
from mimprobe.refinement import RefineConfig
from mimprobe.options import build_config
from mimprobe.refinement.schedules import ema_progress_warning
from mimprobe.refinement.heads import HeadConfig
from mimprobe.refinement.network import RefineNetwork
from mimprobe.refinement.sizing import (checkpoint_bytes, default_local_size, proportional_head_dims, resolve_head_dims)
from mimprobe.refinement.optim import ema_progress


def test_proportional_head_widths_are_the_official_ones_times_the_width_over_vit_l():
    assert proportional_head_dims(1024) == (2048, 256, 4096)      # ViT-L: the official widths
    assert proportional_head_dims(192) == (384, 48, 768)          # ViT-Tiny: 2048 x 192 / 1024, ...
    assert proportional_head_dims(384) == (768, 96, 1536)         # ViT-S
    assert proportional_head_dims(64) == (128, 16, 256)           # timm's test_vit
    assert proportional_head_dims(8) == (16, 16, 32)              # at least 16, multiples of 16


def test_auto_head_widths_are_proportional_only_on_a_cpu_below_224_px():
    auto = RefineConfig()
    assert resolve_head_dims(auto, embed_dim=192, img_size=32, device_type="cpu") == (384, 48, 768)
    assert resolve_head_dims(auto, embed_dim=192, img_size=32, device_type="cuda") == (2048, 256, 4096)
    assert resolve_head_dims(auto, embed_dim=192, img_size=224, device_type="cpu") == (2048, 256, 4096)
    forced = RefineConfig(head_dims="proportional")
    assert resolve_head_dims(forced, embed_dim=192, img_size=224, device_type="cuda") == (384, 48, 768)
    given = RefineConfig(head_dims=(64, 16, 64))  # widths given are kept whatever the device
    assert resolve_head_dims(given, embed_dim=192, img_size=32, device_type="cpu") == (64, 16, 64)


def test_local_crops_are_96_of_224_of_the_input_rounded_to_the_patch():
    assert default_local_size(224, 16) == 96            # the official size
    assert default_local_size(32, 16) == 16             # 13.7 px: one patch
    assert default_local_size(64, 8) == 24              # 27.4 px -> 3 patches of 8
    assert default_local_size(448, 14) == 196           # 192 px -> 14 patches of 14


def test_head_dims_option_takes_three_widths_or_a_rule():
    config = build_config(RefineConfig, {"head_dims": "2048,256,4096"})
    assert (config.head_hidden_dim, config.head_proj_dim, config.head_predictor_dim) == (2048, 256, 4096)
    assert build_config(RefineConfig, {"head_dims": [32, 16, 32]}).head_dims == (32, 16, 32)
    for word in ("auto", "official", "proportional"):
        assert build_config(RefineConfig, {"head_dims": word}).head_widths == word
    for bad in ("1,2", "wide", "1,2,x"):
        with pytest.raises(BadInputError, match="--head-dims"):
            build_config(RefineConfig, {"head_dims": bad})
    with pytest.raises(BadInputError, match="--head-dims 'wide'"):
        RefineConfig(head_dims="wide")


def test_ema_progress_is_the_ratio_of_distances_from_the_start():
    """Closed form: ema half-way along the straight line from start to trained -> 0.5; at the start -> 0; norms over
    all parameters together (not a mean of per-tensor ratios)."""
    start = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    trained = {"a": torch.tensor([2.0, 0.0, 0.0]), "b": torch.full((2, 2), 1.0)}   # |trained - start| = sqrt(8)
    assert ema_progress(start, trained, {k: v / 2 for k, v in trained.items()}) == pytest.approx(0.5)
    assert ema_progress(start, trained, start) == 0.0
    ema = {"a": torch.tensor([2.0, 0.0, 0.0]), "b": torch.zeros(2, 2)}            # |ema - start| = 2
    assert ema_progress(start, trained, ema) == pytest.approx(2 / 8 ** 0.5)
    assert ema_progress(start, start, start) is None
    assert ema_progress_warning(0.49).startswith("warning: the exported EMA encoder moved only 49%")
    assert ema_progress_warning(0.5) is None and ema_progress_warning(None) is None


def test_checkpoint_size_counts_weights_heads_adamw_moments_and_ema():
    """By hand from parameter counts x 4 bytes: a ViT-Tiny encoder (22 MB) with 2 heads of the official vs the
    proportional widths."""
    import timm

    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    n_encoder = sum(p.numel() for p in encoder.parameters())
    sizes = {}
    for dims in ((2048, 256, 4096), proportional_head_dims(192)):
        network = RefineNetwork(encoder, [10, 11], HeadConfig(*dims))
        queues = nn.ModuleDict({str(b): nn.Module() for b in (10, 11)})
        for module in queues.values():
            module.register_buffer("features", torch.zeros(100, dims[1]))
        n_heads = sum(p.numel() for p in network.heads.parameters())
        head_buffers = sum(b.numel() * b.element_size() for b in network.heads.buffers())
        found = checkpoint_bytes(encoder, network.heads, queues, trained_encoder_params=n_encoder, full_stage=True)
        assert found["export"] == 4 * n_encoder + sum(b.numel() * 4 for b in encoder.buffers())
        assert found["checkpoint"] == (2 * found["export"] + 4 * n_heads + head_buffers + 2 * 100 * dims[1] * 4
                                       + 2 * 4 * (n_encoder + n_heads))
        heads_only = checkpoint_bytes(encoder, network.heads, queues, trained_encoder_params=n_encoder,
                                      full_stage=False)
        assert heads_only["checkpoint"] == found["checkpoint"] - found["export"] - 2 * 4 * n_encoder
        sizes[dims] = found["checkpoint"]
    official, proportional = sizes.values()
    # 2 official heads: 261.6 MB; proportional: 95.5 MB, of which 88 MB are the encoder, its EMA and AdamW moments
    assert 250e6 < official < 270e6 and 90e6 < proportional < 100e6
