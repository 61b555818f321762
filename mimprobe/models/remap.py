"""Checkpoint formats: detection by key signature and pure dict-to-dict remaps to timm ``VisionTransformer`` names.

The key layouts are those of the official releases (see DESIGN.md and checkpoint-formats.md):

* MAE (facebookresearch/mae): timm names already; full pre-training files add ``mask_token`` and ``decoder_*``.
* data2vec 2.0 (fairseq): ``modality_encoders.IMAGE.*`` embeddings, post-norm ``blocks.*``, no final norm.
* MIM-Refiner (ml-jku/MIM-Refiner): ``cls_tokens.tokens``, 4-D ``pos_embed.embed``, ``embed_norm`` for
  refined data2vec 2.0 models.
* timm / DINO / DINOv2 / plain state dicts, under ``model`` / ``state_dict`` / ``teacher`` wrappers and DDP
  ``module.`` or ``torch.compile`` ``_orig_mod.`` prefixes; DINOv2 training files with ``block_chunks``
  (``blocks.{chunk}.{i}.*``) and fvcore's ``teacher.backbone.*`` names.
* I-JEPA (facebookresearch/ijepa): ``target_encoder`` (else ``encoder``) beside ``predictor``; no CLS token.
* ConvNeXt V2 FCMAE pre-training (facebookresearch/ConvNeXt-V2 ``models/fcmae.py``): the sparse
  (MinkowskiEngine) encoder under ``encoder.``, beside ``proj``, ``mask_token``, ``decoder`` and ``pred``; turned
  into the official dense ConvNeXt V2 layout, which timm's ``convnext.checkpoint_filter_fn`` renames for timm.
* SimMIM Swin pre-training (microsoft/SimMIM ``models/simmim.py``): the original Swin layout under ``encoder.``
  with ``encoder.mask_token`` and a ``decoder``; timm's ``swin_transformer.checkpoint_filter_fn`` then drops the
  ``relative_position_index``/``attn_mask`` buffers and moves each stage's patch merging to the next stage.

Official ConvNeXt (V1/V2, ``downsample_layers``/``dwconv``) and Swin (``layers.0.downsample``) files of other kinds
(fine-tuned, supervised) keep their names here: timm's own filters convert them when they are loaded.

Formats are checked from the most specific signature to the least: timm's own ``checkpoint_filter_fn`` treats any
``mask_token`` as DINOv2 and would send full MAE files to its DINOv2 converter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError

# Tried in this order when a level of the checkpoint holds no tensors. DINO/iBOT keep the teacher (the model
# they evaluate); I-JEPA keeps target_encoder (as MIM-Refiner does).
WRAPPER_KEYS = ("teacher", "target_encoder", "state_dict", "model", "module", "encoder")
STRIP_PREFIXES = ("module.", "_orig_mod.")

D2V_PREFIX = "modality_encoders.IMAGE."
POST_NORM_KWARGS = {"pre_norm": True, "final_norm": False, "post_norm_blocks": True}
# FCMAE encoders end without the norm of timm's ConvNeXt head: `mimprobe.models.loading` removes it
NO_HEAD_NORM_KWARGS = {"head_norm": False}
FCMAE_KERNEL = re.compile(r"(encoder\.)?stages\.\d+\.\d+\.dwconv\.kernel")
SIMMIM_SWIN_KEY = "encoder.layers.0.blocks.0.attn.relative_position_bias_table"

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """A checkpoint turned into timm names.

    Attributes:
        state_dict: Tensors under timm ``VisionTransformer`` names.
        format: Detected format (``timm``, ``mae``, ``data2vec2``, ``mim-refiner``, ``dino`` (DINO/iBOT teacher or
            student files), ``dinov2``, ``ijepa``, ``beit``, ``fcmae`` (ConvNeXt V2), ``simmim`` (Swin)).
        model_kwargs: Architecture arguments the format needs (JSON-serialisable; ``post_norm_blocks`` means
            ``block_fn=PostNormBlock``, ``head_norm=False`` a head without its norm), including ``num_classes``
            from the head (0 without one).
        notes: What was unwrapped or dropped, for the user.
    """

    state_dict: StateDict
    format: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def unwrap_checkpoint(checkpoint: Any) -> tuple[StateDict, list[str]]:
    """Find the state dict inside a loaded checkpoint.

    Descends through wrapper keys (``teacher``, ``target_encoder``, ``state_dict``, ``model``, ``module``,
    ``encoder``) until a level holds tensors; non-tensor entries at that level (fairseq's ``_ema`` copy,
    counters) are dropped and noted.

    Returns:
        The flat state dict and the notes.

    Raises:
        CheckpointError: No level with tensors was found.
    """
    notes: list[str] = []
    level = checkpoint
    while True:
        if not isinstance(level, Mapping):
            raise CheckpointError(f"checkpoint holds a {type(level).__name__}, not a dict of tensors: "
                                  "save the model's state_dict()")
        if any(isinstance(value, torch.Tensor) for value in level.values()):
            break
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(level.get(key), Mapping)), None)
        if wrapper is None:
            keys = ", ".join(list(map(str, level.keys()))[:8])
            raise CheckpointError(f"no state dict found in the checkpoint (top-level keys: {keys}); expected "
                                  f"tensors or one of the wrappers {', '.join(WRAPPER_KEYS)}")
        notes.append(f"unwrapped '{wrapper}'")
        level = level[wrapper]
    dropped = [str(key) for key, value in level.items() if not isinstance(value, torch.Tensor)]
    if dropped:
        notes.append(f"dropped non-tensor entries: {', '.join(dropped[:5])}")
    return {str(key): value for key, value in level.items() if isinstance(value, torch.Tensor)}, notes


def strip_prefixes(state_dict: StateDict) -> StateDict:
    """Remove DDP ``module.`` and ``torch.compile`` ``_orig_mod.`` prefixes (repeatedly, at the start of keys),
    and keep only the ``backbone.`` part of DINO/iBOT/DINOv2 teacher or student dicts (their ``head.*`` /
    ``dino_head.*`` is the projection head, not a classifier); DINOv2 fvcore files hold both networks
    (``student.backbone.*``, ``teacher.backbone.*``): the teacher is kept."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    if any(key.startswith("teacher.backbone.") for key in out):  # DINOv2 fvcore files: student.* and teacher.*
        out = {key[len("teacher."):]: value for key, value in out.items() if key.startswith("teacher.backbone.")}
    if any(key.startswith("backbone.") for key in out):
        out = {key[len("backbone."):]: value for key, value in out.items() if key.startswith("backbone.")}
    return out


def flatten_block_chunks(state_dict: StateDict) -> StateDict:
    """DINOv2 ``block_chunks``: ``blocks.{chunk}.{i}.*`` → ``blocks.{i}.*``.

    DINOv2's training builds its blocks as ``BlockChunk`` lists (facebookresearch/dinov2
    ``dinov2/models/vision_transformer.py``); chunk ``c`` holds Identity padding and then its own blocks, so the
    second index is already the global block number. Unchanged when no key has two block indices.
    """
    chunked = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")
    if not any(chunked.fullmatch(key) for key in state_dict):
        return state_dict
    return {(f"blocks.{m.group(2)}.{m.group(3)}" if (m := chunked.fullmatch(key)) else key): value
            for key, value in state_dict.items()}


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the format of a flat state dict from its key signature (most specific first).

    ``mae`` also covers encoder-only MAE files (``mae_pretrain_vit_*.pth``: timm names, and the fixed sin-cos
    ``pos_embed`` keeps an exactly zero CLS row, which a learned or timm-initialised one never has).
    """
    keys = state_dict.keys()
    if any(FCMAE_KERNEL.fullmatch(key) for key in keys):
        return "fcmae"
    if SIMMIM_SWIN_KEY in keys:
        return "simmim"
    if any(key.startswith(D2V_PREFIX) or key.startswith("model." + D2V_PREFIX) for key in keys):
        return "data2vec2"
    if "cls_tokens.tokens" in keys and state_dict.get("pos_embed.embed", torch.empty(0)).ndim == 4:
        return "mim-refiner"
    if "blocks.0.attn.q_bias" in keys or any(".gamma_1" in key for key in keys):
        return "beit"
    if "decoder_embed.weight" in keys and "decoder_pred.weight" in keys:
        return "mae"
    mask_token = state_dict.get("mask_token")
    if (mask_token is not None and mask_token.ndim == 2) or "register_tokens" in keys:
        return "dinov2"
    pos_embed = state_dict.get("pos_embed")
    if "cls_token" in keys and pos_embed is not None and pos_embed.ndim == 3 and pos_embed.shape[1] > 1 \
            and not pos_embed[:, 0].any() and pos_embed[:, 1:].any():
        return "mae"
    return "timm"


def remap_mae(state_dict: StateDict) -> StateDict:
    """Official MAE full pre-training checkpoint → timm: keep the encoder, drop ``mask_token`` and ``decoder_*``.

    The encoder already uses timm names; ``pos_embed`` (1, 1+N, D) keeps its all-zero CLS row.
    """
    return {key: value for key, value in state_dict.items()
            if key != "mask_token" and not key.startswith("decoder_")}


def remap_fcmae(state_dict: StateDict) -> StateDict:
    """ConvNeXt V2 FCMAE pre-training checkpoint → the official dense ConvNeXt V2 layout (``downsample_layers``,
    ``stages.{s}.{j}.dwconv|norm|pwconv1|grn|pwconv2``), as the official fine-tuning reads it
    (facebookresearch/ConvNeXt-V2 ``utils.py remap_checkpoint_keys``).

    The decoder (``proj``, ``mask_token``, ``decoder.*``, ``pred``) is dropped and ``encoder.`` stripped. The sparse
    encoder's MinkowskiEngine layers become dense ones: a convolution ``kernel`` (K*K, in, out) → ``weight`` (out,
    in, K, K) and a depthwise ``kernel`` (K*K, dim) → (dim, 1, K, K), both with the official reshape (the kernel
    offsets are stored x-major, hence the final transpose of the two spatial axes); ``MinkowskiLinear.linear.*``
    and ``MinkowskiLayerNorm.ln.*`` lose their inner name; (1, dim) biases become (dim,); GRN ``gamma``/``beta``
    (1, dim) become (1, 1, 1, dim). The encoder has no final norm and no head.
    """
    with_decoder = any(key.startswith("encoder.") for key in state_dict)  # else an encoder saved alone
    out: StateDict = {}
    for key, value in state_dict.items():
        if with_decoder and not key.startswith("encoder."):
            continue  # proj, mask_token, decoder.*, pred: the pre-training decoder
        key = key[len("encoder."):] if key.startswith("encoder.") else key
        parts = key.split(".")
        if parts[-1] == "kernel":
            weight_key = ".".join(parts[:-1]) + ".weight"
            size = math.isqrt(value.shape[0])
            if value.ndim == 3:  # (K*K, in, out) convolution
                _, in_dim, out_dim = value.shape
                out[weight_key] = value.permute(2, 1, 0).reshape(out_dim, in_dim, size, size).transpose(3, 2)
            else:  # (K*K, dim) depthwise convolution
                dim = value.shape[1]
                out[weight_key] = value.permute(1, 0).reshape(dim, 1, size, size).transpose(3, 2)
            continue
        if len(parts) > 2 and parts[-2] in ("ln", "linear"):
            key = ".".join(parts[:-2] + parts[-1:])
        if key.endswith("bias") and value.ndim != 1:
            value = value.reshape(-1)
        elif ".grn." in key:
            value = value.reshape(1, 1, 1, -1)
        out[key] = value
    return out


def remap_simmim(state_dict: StateDict) -> StateDict:
    """SimMIM Swin pre-training checkpoint → the original Swin layout: keep ``encoder.*`` without the prefix,
    drop ``encoder.mask_token`` and the ``decoder`` (microsoft/SimMIM ``utils.py load_pretrained`` keeps the same
    keys). The Swin-specific renames are timm's filter's, at load time."""
    return {key[len("encoder."):]: value for key, value in state_dict.items()
            if key.startswith("encoder.") and key != "encoder.mask_token"}


def _fold_patch_bias(pos: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(1, N, D) patch positions → (1, 1+N, D) timm ``pos_embed`` with a zero CLS row, the patch-embedding bias
    added to every patch position (exact: the bias and the positions are both added to every patch token, and
    the CLS token has no position). Needed because timm builds a bias-free patch embedding when ``pre_norm``."""
    if bias is not None:
        pos = pos + bias.view(1, 1, -1)
    return torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)


def remap_data2vec2(state_dict: StateDict) -> StateDict:
    """data2vec 2.0 image checkpoint (fairseq) → timm names for the post-norm recipe.

    ``extra_tokens`` → ``cls_token``; ``local_encoder.proj`` → ``patch_embed.proj`` (bias folded into
    ``pos_embed``); ``fixed_positional_encoder.positions`` (1, N, D), no CLS slot → ``pos_embed`` with a zero CLS
    row; ``context_encoder.norm`` → ``norm_pre``; prenet ``context_encoder.blocks.{j}`` → ``blocks.{j}`` and main
    ``blocks.{i}`` → ``blocks.{i+P}``. The decoder and the ``_ema`` teacher copy are dropped. Fine-tuned files
    (everything under ``model.``, plus ``fc_norm``/``head``) are handled the same way.
    """
    if any(key.startswith("model." + D2V_PREFIX) for key in state_dict):
        state_dict = {(key[len("model."):] if key.startswith("model.") else key): value
                      for key, value in state_dict.items()}
    prenet = re.compile(re.escape(D2V_PREFIX) + r"context_encoder\.blocks\.(\d+)\.(.+)")
    main = re.compile(r"blocks\.(\d+)\.(.+)")
    num_prenet = len({int(m.group(1)) for key in state_dict if (m := prenet.fullmatch(key))})
    renames = {
        D2V_PREFIX + "extra_tokens": "cls_token",
        D2V_PREFIX + "local_encoder.proj.weight": "patch_embed.proj.weight",
        D2V_PREFIX + "context_encoder.norm.weight": "norm_pre.weight",
        D2V_PREFIX + "context_encoder.norm.bias": "norm_pre.bias",
    }
    position_keys = (D2V_PREFIX + "fixed_positional_encoder.positions", D2V_PREFIX + "positional_encoder.pos_embed")
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(D2V_PREFIX + "decoder.") or key.startswith("_ema") or key in position_keys \
                or key == D2V_PREFIX + "local_encoder.proj.bias":
            continue
        if key in renames:
            out[renames[key]] = value
        elif m := prenet.fullmatch(key):
            out[f"blocks.{m.group(1)}.{m.group(2)}"] = value
        elif m := main.fullmatch(key):
            out[f"blocks.{int(m.group(1)) + num_prenet}.{m.group(2)}"] = value
        else:
            out[key] = value  # unknown keys stay, so the strict load names them
    positions = next((state_dict[key] for key in position_keys if key in state_dict), None)
    if positions is not None:
        out["pos_embed"] = _fold_patch_bias(positions, state_dict.get(D2V_PREFIX + "local_encoder.proj.bias"))
    return out


def remap_mim_refiner(state_dict: StateDict) -> StateDict:
    """MIM-Refiner checkpoint → timm names.

    ``cls_tokens.tokens`` → ``cls_token``; ``pos_embed.embed`` (1, H, W, D), added before CLS is prepended →
    ``pos_embed`` (1, 1+HW, D) with a zero CLS row. Refined data2vec 2.0 models (``embed_norm``, post-norm, no
    final norm) map ``embed_norm`` → ``norm_pre`` and fold the patch bias into ``pos_embed``.
    """
    post_norm = "embed_norm.weight" in state_dict
    out: StateDict = {}
    for key, value in state_dict.items():
        if key == "cls_tokens.tokens":
            out["cls_token"] = value
        elif key.startswith("embed_norm."):
            out["norm_pre." + key[len("embed_norm."):]] = value
        elif key == "pos_embed.embed" or (post_norm and key == "patch_embed.proj.bias"):
            continue
        else:
            out[key] = value
    grid = state_dict["pos_embed.embed"]
    positions = grid.reshape(1, grid.shape[1] * grid.shape[2], grid.shape[3])  # (1, H*W, D)
    bias = state_dict.get("patch_embed.proj.bias") if post_norm else None
    out["pos_embed"] = _fold_patch_bias(positions, bias)
    return out


def _head_kwargs(state_dict: StateDict) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0}
    if "fc_norm.weight" in state_dict and "norm.weight" not in state_dict:
        kwargs["global_pool"] = "avg"  # fine-tuned MAE / data2vec: average pooling with fc_norm
    return kwargs


def _is_ijepa(checkpoint: Any) -> bool:
    """I-JEPA's training files hold ``encoder``/``target_encoder`` beside a ``predictor`` (facebookresearch/ijepa
    ``src/train.py`` ``save_checkpoint``)."""
    return isinstance(checkpoint, Mapping) and "predictor" in checkpoint and (
        "target_encoder" in checkpoint or "encoder" in checkpoint)


def convert_checkpoint(checkpoint: Any) -> ConvertedCheckpoint:
    """Unwrap, detect and remap a loaded checkpoint to timm names (pure: the input is not modified)."""
    state_dict, notes = unwrap_checkpoint(checkpoint)
    from_dino_teacher = any(key.startswith(("backbone.", "module.backbone.", "teacher.backbone."))
                            for key in state_dict)
    state_dict = strip_prefixes(state_dict)
    flat = flatten_block_chunks(state_dict)
    if flat is not state_dict:
        notes.append("DINOv2 block chunks: blocks.C.I.* read as blocks.I.*")
        state_dict = flat
    if "masked_embed" in state_dict:  # iBOT's mask embedding is used only in pre-training
        state_dict = {key: value for key, value in state_dict.items() if key != "masked_embed"}
        notes.append("dropped iBOT masked_embed")
    fmt = detect_format(state_dict)
    if fmt == "timm" and _is_ijepa(checkpoint):
        fmt = "ijepa"
        notes.append("I-JEPA checkpoint: no CLS token (use a *_gap_* model); the target encoder is loaded"
                     if "unwrapped 'target_encoder'" in notes else "I-JEPA checkpoint: no CLS token")
    elif fmt == "timm" and from_dino_teacher:
        fmt = "dino"
    model_kwargs: dict[str, Any] = {}
    if fmt == "data2vec2":
        state_dict = remap_data2vec2(state_dict)
        model_kwargs.update(POST_NORM_KWARGS)
        notes.append("data2vec 2.0 layout: post-norm blocks, no final norm, patch bias folded into pos_embed")
    elif fmt == "mim-refiner":
        post_norm = "embed_norm.weight" in state_dict
        state_dict = remap_mim_refiner(state_dict)
        if post_norm:
            model_kwargs.update(POST_NORM_KWARGS)
            notes.append("MIM-Refiner (refined data2vec 2.0): post-norm blocks, no final norm")
    elif fmt == "fcmae":
        dropped = [key for key in state_dict if not key.startswith("encoder.")]
        state_dict = remap_fcmae(state_dict)
        model_kwargs.update(NO_HEAD_NORM_KWARGS)
        notes.append(f"ConvNeXt V2 FCMAE pre-training checkpoint: kept the sparse encoder as dense layers, dropped "
                     f"{len(dropped)} decoder/mask keys; no final norm")
    elif fmt == "simmim":
        dropped = [key for key in state_dict if not key.startswith("encoder.") or key == "encoder.mask_token"]
        state_dict = remap_simmim(state_dict)
        notes.append(f"SimMIM Swin pre-training checkpoint: kept the encoder, dropped {len(dropped)} decoder/mask "
                     "keys")
    elif fmt == "mae":
        dropped = [key for key in state_dict if key == "mask_token" or key.startswith("decoder_")]
        state_dict = remap_mae(state_dict)
        notes.append(f"MAE pre-training checkpoint: kept the encoder, dropped {len(dropped)} decoder/mask keys"
                     if dropped else "MAE encoder (fixed sin-cos pos_embed with a zero CLS row)")
    model_kwargs.update(_head_kwargs(state_dict))
    if "fc_norm.weight" in state_dict and model_kwargs.get("final_norm") is False:
        # fine-tuned post-norm files pool, then fc_norm; timm builds fc_norm only with final_norm=True (with avg
        # pooling its pre-pool `norm` is then an Identity, so the encoder still ends without a norm)
        del model_kwargs["final_norm"]
    return ConvertedCheckpoint(state_dict=state_dict, format=fmt, model_kwargs=model_kwargs, notes=tuple(notes))
