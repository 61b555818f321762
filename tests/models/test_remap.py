"""Pure checkpoint remaps: unwrapping, prefix stripping, format detection and key renames on plain dicts.

The end-to-end check that each remap yields a strict load with the right outputs is in test_loading.py; these
tests pin down the dict-to-dict functions themselves (which keys go, which stay, and that inputs are untouched).
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from mimprobe.errors import CheckpointError
from mimprobe.models import (
    convert_checkpoint,
    detect_format,
    remap_data2vec2,
    remap_fcmae,
    remap_mae,
    remap_mim_refiner,
    remap_simmim,
    strip_prefixes,
    unwrap_checkpoint,
)

D2V = "modality_encoders.IMAGE."
WIDTH = 8


def tensor(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def encoder_keys() -> dict[str, torch.Tensor]:
    """A minimal timm-named encoder (2 blocks, width 8, 4 patches)."""
    state_dict = {
        "cls_token": tensor(1, 1, WIDTH),
        "pos_embed": tensor(1, 5, WIDTH),
        "patch_embed.proj.weight": tensor(WIDTH, 3, 16, 16),
        "patch_embed.proj.bias": tensor(WIDTH),
        "norm.weight": tensor(WIDTH),
        "norm.bias": tensor(WIDTH),
    }
    for block in range(2):
        state_dict[f"blocks.{block}.attn.qkv.weight"] = tensor(3 * WIDTH, WIDTH)
        state_dict[f"blocks.{block}.norm1.weight"] = tensor(WIDTH)
    return state_dict


def mae_full_keys() -> dict[str, torch.Tensor]:
    decoder = {
        "mask_token": tensor(1, 1, 4),
        "decoder_embed.weight": tensor(4, WIDTH),
        "decoder_embed.bias": tensor(4),
        "decoder_pos_embed": tensor(1, 5, 4),
        "decoder_blocks.0.norm1.weight": tensor(4),
        "decoder_blocks.0.attn.qkv.weight": tensor(12, 4),
        "decoder_norm.weight": tensor(4),
        "decoder_norm.bias": tensor(4),
        "decoder_pred.weight": tensor(768, 4),
        "decoder_pred.bias": tensor(768),
    }
    return {**encoder_keys(), **decoder}


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert left[key] is right[key] or torch.equal(left[key], right[key]), key


# --- unwrap_checkpoint -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "teacher", "target_encoder", "module", "encoder"])
def test_unwrap_finds_the_state_dict_under_each_wrapper(wrapper):
    state_dict = encoder_keys()
    unwrapped, notes = unwrap_checkpoint({wrapper: state_dict, "epoch": 3, "args": argparse.Namespace(lr=1.0)})
    assert_same_tensors(unwrapped, state_dict)
    assert notes == [f"unwrapped '{wrapper}'"]


def test_unwrap_prefers_teacher_over_student_and_model():
    teacher = {"backbone.cls_token": tensor(1, 1, WIDTH)}
    student = {"module.backbone.cls_token": tensor(1, 1, WIDTH)}
    unwrapped, _ = unwrap_checkpoint({"student": student, "teacher": teacher, "model": {"x": tensor(1)}})
    assert_same_tensors(unwrapped, teacher)


def test_unwrap_descends_nested_wrappers():
    state_dict = encoder_keys()
    unwrapped, notes = unwrap_checkpoint({"state_dict": {"model": state_dict}})
    assert_same_tensors(unwrapped, state_dict)
    assert notes == ["unwrapped 'state_dict'", "unwrapped 'model'"]


def test_unwrap_drops_nested_non_tensor_entries_with_a_note():
    state_dict = encoder_keys()
    ema = {key: value + 1 for key, value in state_dict.items()}
    unwrapped, notes = unwrap_checkpoint({"model": {**state_dict, "_ema": ema, "num_updates": 7}})
    assert_same_tensors(unwrapped, state_dict)
    assert "_ema" not in unwrapped and "num_updates" not in unwrapped
    assert notes[0] == "unwrapped 'model'"
    assert "dropped non-tensor entries" in notes[1] and "_ema" in notes[1] and "num_updates" in notes[1]


def test_unwrap_plain_state_dict_has_no_notes():
    state_dict = encoder_keys()
    unwrapped, notes = unwrap_checkpoint(state_dict)
    assert_same_tensors(unwrapped, state_dict)
    assert notes == []


@pytest.mark.parametrize("checkpoint", [
    {"epoch": 3, "optimizer": {"lr": 0.1}},
    [tensor(2)],
    tensor(3),
    {"model": [tensor(2)]},
])
def test_unwrap_rejects_checkpoints_without_tensors(checkpoint):
    with pytest.raises(CheckpointError):
        unwrap_checkpoint(checkpoint)


def test_unwrap_error_names_the_top_level_keys():
    with pytest.raises(CheckpointError, match="epoch.*optimizer"):
        unwrap_checkpoint({"epoch": 3, "optimizer": {"lr": 0.1}})


# --- strip_prefixes ----------------------------------------------------------------------------------------------


def test_strip_prefixes_removes_repeated_and_mixed_prefixes():
    value = tensor(2)
    stripped = strip_prefixes({
        "module.module.cls_token": value,
        "_orig_mod.module.blocks.0.norm1.weight": value,
        "module._orig_mod.norm.weight": value,
        "pos_embed": value,
    })
    assert sorted(stripped) == ["blocks.0.norm1.weight", "cls_token", "norm.weight", "pos_embed"]


def test_strip_prefixes_only_strips_at_the_start():
    stripped = strip_prefixes({"blocks.0.module.weight": tensor(2), "head._orig_mod.bias": tensor(2)})
    assert sorted(stripped) == ["blocks.0.module.weight", "head._orig_mod.bias"]


def test_strip_prefixes_keeps_only_the_dino_backbone():
    stripped = strip_prefixes({
        "module.backbone.cls_token": tensor(1, 1, WIDTH),
        "module.backbone.blocks.0.norm1.weight": tensor(WIDTH),
        "module.head.mlp.0.weight": tensor(16, WIDTH),
        "module.head.last_layer.weight_g": tensor(32, 1),
    })
    assert sorted(stripped) == ["blocks.0.norm1.weight", "cls_token"]


# --- detect_format -----------------------------------------------------------------------------------------------


def test_detect_plain_timm():
    assert detect_format(encoder_keys()) == "timm"


def test_detect_mae_full():
    assert detect_format(mae_full_keys()) == "mae"


def test_detect_mae_takes_precedence_over_a_3d_mask_token():
    # timm's checkpoint_filter_fn would send this to its DINOv2 converter on the bare presence of mask_token
    state_dict = mae_full_keys()
    assert state_dict["mask_token"].ndim == 3
    assert detect_format(state_dict) == "mae"


def test_detect_dinov2_from_a_2d_mask_token_or_registers():
    assert detect_format({**encoder_keys(), "mask_token": tensor(1, WIDTH)}) == "dinov2"
    assert detect_format({**encoder_keys(), "register_tokens": tensor(1, 4, WIDTH)}) == "dinov2"


def test_detect_3d_mask_token_without_decoder_is_not_dinov2():
    assert detect_format({**encoder_keys(), "mask_token": tensor(1, 1, WIDTH)}) == "timm"


def test_detect_mae_needs_both_decoder_embed_and_pred():
    state_dict = mae_full_keys()
    del state_dict["decoder_pred.weight"]
    assert detect_format(state_dict) != "mae"


@pytest.mark.parametrize("prefix", ["", "model."])
def test_detect_data2vec2(prefix):
    state_dict = {prefix + D2V + "local_encoder.proj.weight": tensor(WIDTH, 3, 16, 16),
                  prefix + "blocks.0.norm1.weight": tensor(WIDTH)}
    assert detect_format(state_dict) == "data2vec2"


def test_detect_mim_refiner_needs_a_4d_pos_embed():
    state_dict = {"cls_tokens.tokens": tensor(1, 1, WIDTH), "pos_embed.embed": tensor(1, 2, 2, WIDTH)}
    assert detect_format(state_dict) == "mim-refiner"
    assert detect_format({**state_dict, "pos_embed.embed": tensor(1, 4, WIDTH)}) != "mim-refiner"


def test_detect_beit():
    assert detect_format({"blocks.0.attn.q_bias": tensor(WIDTH)}) == "beit"
    assert detect_format({"blocks.0.gamma_1": tensor(WIDTH)}) == "beit"


@pytest.mark.parametrize("prefix", ["encoder.", ""])
def test_detect_fcmae_from_a_sparse_depthwise_kernel_whatever_its_mask_token(prefix):
    state_dict = {prefix + "stages.0.0.dwconv.kernel": tensor(49, 8), prefix + "stages.0.0.dwconv.bias": tensor(1, 8),
                  "mask_token": tensor(1, 16, 1, 1)}
    assert detect_format(state_dict) == "fcmae"
    dense = {"stages.0.0.dwconv.weight": tensor(8, 1, 7, 7)}  # official fine-tuned layout: timm's filter reads it
    assert detect_format(dense) == "timm"


def test_detect_simmim_swin_needs_the_encoder_prefix():
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert detect_format({"encoder." + key: tensor(49, 2), "encoder.mask_token": tensor(1, 1, WIDTH)}) == "simmim"
    assert detect_format({key: tensor(49, 2)}) == "timm"  # fine-tuned Swin: timm's filter reads it


# --- remaps ------------------------------------------------------------------------------------------------------


def test_remap_fcmae_keeps_an_encoder_saved_alone_and_drops_the_decoder_otherwise():
    encoder = {"downsample_layers.1.0.ln.weight": tensor(8), "stages.0.0.pwconv1.linear.weight": tensor(32, 8),
               "stages.0.0.grn.gamma": tensor(1, 32), "stages.0.0.dwconv.bias": tensor(1, 8)}
    expected = {"downsample_layers.1.0.weight": (8,), "stages.0.0.pwconv1.weight": (32, 8),
                "stages.0.0.grn.gamma": (1, 1, 1, 32), "stages.0.0.dwconv.bias": (8,)}
    alone = remap_fcmae(encoder)
    assert {key: tuple(value.shape) for key, value in alone.items()} == expected
    with_decoder = remap_fcmae({**{"encoder." + key: value for key, value in encoder.items()},
                                "proj.weight": tensor(4, 8, 1, 1), "mask_token": tensor(1, 4, 1, 1),
                                "decoder.0.norm.weight": tensor(4), "pred.bias": tensor(12)})
    assert with_decoder.keys() == expected.keys()
    assert torch.equal(with_decoder["downsample_layers.1.0.weight"], encoder["downsample_layers.1.0.ln.weight"])


def test_remap_simmim_keeps_the_encoder_without_its_mask_token():
    remapped = remap_simmim({"encoder.norm.weight": tensor(WIDTH), "encoder.mask_token": tensor(1, 1, WIDTH),
                             "decoder.0.weight": tensor(3, WIDTH, 1, 1), "decoder.0.bias": tensor(3)})
    assert list(remapped) == ["norm.weight"]


def test_remap_mae_drops_exactly_the_decoder_and_mask_keys():
    state_dict = mae_full_keys()
    remapped = remap_mae(state_dict)
    assert set(remapped) == set(encoder_keys())
    assert all(remapped[key] is state_dict[key] for key in remapped)
    assert set(state_dict) - set(remapped) == {key for key in state_dict
                                               if key == "mask_token" or key.startswith("decoder_")}


def test_remap_mae_keeps_fine_tuned_heads():
    state_dict = {**encoder_keys(), "fc_norm.weight": tensor(WIDTH), "head.weight": tensor(10, WIDTH)}
    assert remap_mae(state_dict).keys() == state_dict.keys()


def test_remap_mim_refiner_reshapes_positions_row_major_with_a_zero_cls_row():
    grid = torch.arange(2 * 3 * WIDTH, dtype=torch.float32).reshape(1, 2, 3, WIDTH)  # (1, H, W, D)
    cls = tensor(1, 1, WIDTH)
    remapped = remap_mim_refiner({"cls_tokens.tokens": cls, "pos_embed.embed": grid,
                                  "patch_embed.proj.bias": tensor(WIDTH), "norm.weight": tensor(WIDTH)})
    assert set(remapped) == {"cls_token", "pos_embed", "patch_embed.proj.bias", "norm.weight"}
    assert remapped["cls_token"] is cls
    pos = remapped["pos_embed"]
    assert pos.shape == (1, 7, WIDTH)
    assert torch.equal(pos[0, 0], torch.zeros(WIDTH))
    for h in range(2):
        for w in range(3):
            assert torch.equal(pos[0, 1 + h * 3 + w], grid[0, h, w])


def test_remap_mim_refiner_post_norm_folds_the_patch_bias():
    grid = tensor(1, 2, 2, WIDTH)
    bias = tensor(WIDTH)
    remapped = remap_mim_refiner({"cls_tokens.tokens": tensor(1, 1, WIDTH), "pos_embed.embed": grid,
                                  "patch_embed.proj.bias": bias, "embed_norm.weight": tensor(WIDTH),
                                  "embed_norm.bias": tensor(WIDTH)})
    assert set(remapped) == {"cls_token", "pos_embed", "norm_pre.weight", "norm_pre.bias"}
    torch.testing.assert_close(remapped["pos_embed"][:, 1:], grid.reshape(1, 4, WIDTH) + bias)
    assert torch.equal(remapped["pos_embed"][0, 0], torch.zeros(WIDTH))


def data2vec_keys(num_prenet: int, num_main: int, prefix: str = "") -> dict[str, torch.Tensor]:
    state_dict = {
        D2V + "extra_tokens": tensor(1, 1, WIDTH),
        D2V + "local_encoder.proj.weight": tensor(WIDTH, 3, 16, 16),
        D2V + "local_encoder.proj.bias": tensor(WIDTH),
        D2V + "fixed_positional_encoder.positions": tensor(1, 4, WIDTH),
        D2V + "context_encoder.norm.weight": tensor(WIDTH),
        D2V + "context_encoder.norm.bias": tensor(WIDTH),
        D2V + "decoder.blocks.0.0.weight": tensor(4, 4, 3),
        D2V + "decoder.proj.weight": tensor(WIDTH, 4),
    }
    for block in range(num_prenet):
        state_dict[D2V + f"context_encoder.blocks.{block}.norm1.weight"] = tensor(WIDTH)
        state_dict[D2V + f"context_encoder.blocks.{block}.mlp.fc1.weight"] = tensor(3 * WIDTH, WIDTH)
    for block in range(num_main):
        state_dict[f"blocks.{block}.norm1.weight"] = tensor(WIDTH)
        state_dict[f"blocks.{block}.mlp.fc1.weight"] = tensor(3 * WIDTH, WIDTH)
    return {prefix + key: value for key, value in state_dict.items()}


@pytest.mark.parametrize("num_prenet", [0, 2])
def test_remap_data2vec2_renames_and_offsets_blocks(num_prenet):
    state_dict = data2vec_keys(num_prenet, 3)
    remapped = remap_data2vec2(state_dict)
    expected_blocks = {f"blocks.{block}.{name}" for block in range(num_prenet + 3)
                       for name in ("norm1.weight", "mlp.fc1.weight")}
    assert set(remapped) == {"cls_token", "patch_embed.proj.weight", "pos_embed", "norm_pre.weight",
                             "norm_pre.bias"} | expected_blocks
    for block in range(num_prenet):
        assert remapped[f"blocks.{block}.norm1.weight"] is state_dict[D2V + f"context_encoder.blocks.{block}.norm1.weight"]
    for block in range(3):
        assert remapped[f"blocks.{block + num_prenet}.norm1.weight"] is state_dict[f"blocks.{block}.norm1.weight"]
    assert remapped["cls_token"] is state_dict[D2V + "extra_tokens"]
    positions = state_dict[D2V + "fixed_positional_encoder.positions"]
    bias = state_dict[D2V + "local_encoder.proj.bias"]
    assert remapped["pos_embed"].shape == (1, 5, WIDTH)
    assert torch.equal(remapped["pos_embed"][0, 0], torch.zeros(WIDTH))
    torch.testing.assert_close(remapped["pos_embed"][:, 1:], positions + bias)


def test_remap_data2vec2_reads_the_legacy_position_name():
    state_dict = data2vec_keys(0, 1)
    positions = state_dict.pop(D2V + "fixed_positional_encoder.positions")
    state_dict[D2V + "positional_encoder.pos_embed"] = positions
    remapped = remap_data2vec2(state_dict)
    torch.testing.assert_close(remapped["pos_embed"][:, 1:], positions + state_dict[D2V + "local_encoder.proj.bias"])
    assert not any("positional_encoder" in key for key in remapped)


def test_remap_data2vec2_fine_tuned_prefix_keeps_the_head():
    state_dict = data2vec_keys(0, 1, prefix="model.")
    state_dict["fc_norm.weight"] = tensor(WIDTH)
    state_dict["head.weight"] = tensor(10, WIDTH)
    remapped = remap_data2vec2(state_dict)
    assert {"fc_norm.weight", "head.weight", "cls_token", "blocks.0.norm1.weight"} <= set(remapped)
    assert not any(key.startswith("model.") for key in remapped)


def test_remap_data2vec2_keeps_unknown_keys_for_the_strict_load_to_name():
    state_dict = {**data2vec_keys(0, 1), D2V + "alibi_scale": tensor(1)}
    assert D2V + "alibi_scale" in remap_data2vec2(state_dict)


# --- purity ------------------------------------------------------------------------------------------------------


def mim_refiner_keys() -> dict[str, torch.Tensor]:
    return {"cls_tokens.tokens": tensor(1, 1, WIDTH), "pos_embed.embed": tensor(1, 2, 2, WIDTH),
            "patch_embed.proj.weight": tensor(WIDTH, 3, 16, 16), "patch_embed.proj.bias": tensor(WIDTH),
            "embed_norm.weight": tensor(WIDTH), "embed_norm.bias": tensor(WIDTH)}


@pytest.mark.parametrize("remap, make", [
    (remap_mae, mae_full_keys),
    (remap_data2vec2, lambda: data2vec_keys(2, 2)),
    (remap_data2vec2, lambda: data2vec_keys(0, 2, prefix="model.")),
    (remap_mim_refiner, mim_refiner_keys),
    (strip_prefixes, lambda: {"module." + key: value for key, value in encoder_keys().items()}),
])
def test_remaps_do_not_modify_their_input(remap, make):
    state_dict = make()
    snapshot = copy.deepcopy(state_dict)
    remap(state_dict)
    assert_same_tensors(state_dict, snapshot)


@pytest.mark.parametrize("checkpoint", [
    {"model": mae_full_keys(), "epoch": 1},
    {"model": {**data2vec_keys(2, 2), "_ema": data2vec_keys(2, 2)}, "cfg": {"model": {"depth": 2}}},
    {"state_dict": mim_refiner_keys(), "stage_id": "abc"},
    {"teacher": {"backbone." + key: value for key, value in encoder_keys().items()}},
    {**encoder_keys(), "mask_token": tensor(1, WIDTH)},
])
def test_convert_checkpoint_does_not_modify_its_input(checkpoint):
    snapshot = copy.deepcopy(checkpoint)
    convert_checkpoint(checkpoint)
    assert checkpoint.keys() == snapshot.keys()
    for key, value in checkpoint.items():
        if isinstance(value, dict):
            assert value.keys() == snapshot[key].keys(), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, snapshot[key]), key


# --- convert_checkpoint ------------------------------------------------------------------------------------------


def test_convert_mae_reports_the_dropped_keys():
    converted = convert_checkpoint({"model": mae_full_keys()})
    assert converted.format == "mae"
    assert set(converted.state_dict) == set(encoder_keys())
    assert converted.model_kwargs == {"num_classes": 0}
    assert any("dropped 10 decoder/mask keys" in note for note in converted.notes)


def test_convert_data2vec2_asks_for_post_norm_blocks():
    converted = convert_checkpoint({"model": data2vec_keys(2, 2)})
    assert converted.format == "data2vec2"
    assert converted.model_kwargs == {"pre_norm": True, "final_norm": False, "post_norm_blocks": True,
                                      "num_classes": 0}


def test_convert_mim_refiner_pre_and_post_norm():
    pre_norm = {key: value for key, value in mim_refiner_keys().items() if not key.startswith("embed_norm.")}
    pre_norm["norm.weight"] = tensor(WIDTH)
    converted = convert_checkpoint({"state_dict": pre_norm})
    assert converted.format == "mim-refiner"
    assert converted.model_kwargs == {"num_classes": 0}
    assert "patch_embed.proj.bias" in converted.state_dict  # pre-norm models keep their patch bias

    converted = convert_checkpoint({"state_dict": mim_refiner_keys()})
    assert converted.format == "mim-refiner"
    assert converted.model_kwargs["post_norm_blocks"] is True and converted.model_kwargs["final_norm"] is False
    assert "patch_embed.proj.bias" not in converted.state_dict


def test_convert_reads_num_classes_and_pooling_from_a_fine_tuned_head():
    state_dict = {key: value for key, value in encoder_keys().items() if not key.startswith("norm.")}
    state_dict.update({"fc_norm.weight": tensor(WIDTH), "fc_norm.bias": tensor(WIDTH),
                       "head.weight": tensor(10, WIDTH), "head.bias": tensor(10)})
    converted = convert_checkpoint(state_dict)
    assert converted.model_kwargs == {"num_classes": 10, "global_pool": "avg"}


def test_a_final_norm_beside_fc_norm_keeps_token_pooling():
    """Only a file without a final ``norm`` is a fine-tuned average-pooling model (MAE's ``global_pool``, which
    deletes ``norm``): with ``norm`` present its features are the normed tokens, so pooling stays timm's default
    (class token) and ``norm`` is kept, not dropped by a model built without it."""
    state_dict = {**encoder_keys(), "fc_norm.weight": tensor(WIDTH), "fc_norm.bias": tensor(WIDTH),
                  "head.weight": tensor(10, WIDTH), "head.bias": tensor(10)}
    assert "norm.weight" in state_dict
    converted = convert_checkpoint(state_dict)
    assert "global_pool" not in converted.model_kwargs and converted.model_kwargs["num_classes"] == 10
    assert "norm.weight" in converted.state_dict


def test_ibot_masked_embed_is_dropped_with_a_note():
    from mimprobe.models import convert_checkpoint

    state_dict = {"cls_token": torch.zeros(1, 1, 4), "masked_embed": torch.zeros(1, 4), "blocks.0.norm1.weight": torch.ones(4)}
    converted = convert_checkpoint({"teacher": {f"backbone.{k}": v for k, v in state_dict.items()}})
    assert "masked_embed" not in converted.state_dict and "cls_token" in converted.state_dict
    assert any("masked_embed" in note for note in converted.notes)
