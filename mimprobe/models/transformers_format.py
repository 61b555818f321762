"""transformers checkpoints: folders written by ``save_pretrained`` and ``hf:ORG/NAME`` hub ids, as timm models.

A folder holds ``config.json`` (the architecture), the weights (``model.safetensors``, ``pytorch_model.bin`` or a
sharded ``*.index.json`` with its shards) and often ``preprocessor_config.json`` (the evaluation transform). timm
has no converter for these layouts (its BEiT/DINOv2 filters read the original Meta/Microsoft files), so this module
gives, for the classes below:

* `timm_model_args`: config.json -> the timm model name and ``create_model`` kwargs that compute the same function
  (width, depth, heads, patch, image size, qkv bias, layer-norm eps exactly, layer scale, registers, relative
  position bias, mean pooling);
* `remap_transformers_state_dict`: a pure dict -> dict remap of the weights to those timm names, chosen by the
  config, for a strict load;
* `preprocessing_from_processor_config`: preprocessor_config.json -> `EvalPreprocessing`.

The transformers key names are those ``save_pretrained`` writes (transformers 4.x and 5.x both write them; the hub
files use them): ``embeddings.*``, ``encoder.layer.{i}.attention.attention.{query,key,value}``, ... (see
transformers/models/{vit,vit_mae,dinov2,dinov2_with_registers,beit,data2vec,deit}/modeling_*.py). The production
path never imports transformers.

Traps handled (each also stated in the load notes):

* ViTMAE shuffles and masks patch tokens at random in its forward (``random_masking``); the timm encoder sees every
  patch in order, which is ViTMAE's forward with ``mask_ratio=0`` and ``noise`` sorted (no shuffle).
* transformers' ViT/BEiT layer norms use eps 1e-12, timm's 1e-6: the config's eps is passed to timm exactly.
* Separate query/key/value projections are fused into timm's ``qkv``; BEiT's key has no bias (timm's Beit keeps
  ``q_bias``/``v_bias`` and a zero ``k_bias``).
* DINOv2's ``mask_token`` is used only in pre-training: dropped. DINOv2 (and DINOv2 with registers) add the CLS
  position to the CLS token before the registers are inserted; timm's register layout (``no_embed_class``) adds
  positions to patches only, so the CLS position is folded into ``cls_token`` (exact: both are added constants).
* Position tables are resampled to the input grid as transformers interpolates them (bicubic, no antialias:
  ``interpolate_pos_encoding``), not with timm's antialiased filter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, CheckpointError
from .checkpoint_io import read_checkpoint
from .preprocessing import INTERPOLATIONS, EvalPreprocessing

StateDict = dict[str, torch.Tensor]

HUB_PREFIX = "hf:"
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
# in order of preference: safetensors never runs code; pickles are read by `read_checkpoint` without running any
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Architecture:
    """A supported transformers class.

    Attributes:
        family: Layout of its encoder: ``vit`` (ViT, ViTMAE), ``dinov2`` (with or without registers), ``beit``
            (BEiT, data2vec-vision) or ``deit`` (distilled DeiT).
        prefix: Prefix of the encoder's keys in the class's state dict (``vit.`` in task models).
        heads: transformers head key prefix -> timm head name (``classifier`` -> ``head``).
        dropped: Key prefixes of parts that are not the encoder (ViTMAE's decoder), dropped with a note.
    """

    family: str
    prefix: str = ""
    heads: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "ViTModel": Architecture("vit"),
    "ViTForImageClassification": Architecture("vit", "vit.", (("classifier.", "head."),)),
    "ViTMAEModel": Architecture("vit"),
    "ViTMAEForPreTraining": Architecture("vit", "vit.", dropped=("decoder.",)),
    "Dinov2Model": Architecture("dinov2"),
    "Dinov2WithRegistersModel": Architecture("dinov2"),
    "BeitModel": Architecture("beit"),
    "BeitForImageClassification": Architecture("beit", "beit.", (("classifier.", "head."),)),
    "Data2VecVisionModel": Architecture("beit"),
    "Data2VecVisionForImageClassification": Architecture("beit", "data2vec_vision.", (("classifier.", "head."),)),
    "DeiTModel": Architecture("deit"),
    "DeiTForImageClassification": Architecture("deit", "deit.", (("classifier.", "head."),)),
    "DeiTForImageClassificationWithTeacher": Architecture(
        "deit", "deit.", (("cls_classifier.", "head."), ("distillation_classifier.", "head_dist."))),
}
# a config.json without ``architectures`` names only its model_type: the base model class of that type
MODEL_TYPES = {"vit": "ViTModel", "vit_mae": "ViTMAEModel", "dinov2": "Dinov2Model",
               "dinov2_with_registers": "Dinov2WithRegistersModel", "beit": "BeitModel",
               "data2vec-vision": "Data2VecVisionModel", "deit": "DeiTModel"}
SUPPORTED = ", ".join(ARCHITECTURES)

# transformers' ACT2FN names -> timm ``act_layer`` names of the same function
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
# PIL resampling codes (preprocessor_config.json ``resample``) -> timm interpolation names
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# timm names whose class (VisionTransformer, VisionTransformerDistilled, Beit) and defaults the kwargs complete
BASE_NAMES = {"vit": "vit_base_patch16_224", "dinov2": "vit_base_patch14_dinov2", "beit": "beit_base_patch16_224",
              "deit": "deit_base_distilled_patch16_224"}
SIZE_WORDS = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1536: "giant"}
TIMM_MODULES = {"vit": "vision_transformer", "dinov2": "vision_transformer", "beit": "beit", "deit": "deit"}


# ---- where a transformers model comes from ----


def is_hub_id(text: Any) -> bool:
    return isinstance(text, str) and text.startswith(HUB_PREFIX)


def is_transformers_folder(path: Any) -> bool:
    """Whether ``path`` is a folder (with or without config.json: a folder is never a timm name or a weight file)."""
    try:
        return path is not None and not is_hub_id(str(path)) and Path(path).is_dir()
    except (OSError, ValueError):
        return False


def download_hub_model(spec: str) -> Path:
    """``hf:ORG/NAME[@REVISION]`` -> the local snapshot folder (huggingface_hub's ``snapshot_download``).

    Only config and weight files are fetched (safetensors when the repository has them, else the pickles). The
    hub's offline mode (``HF_HUB_OFFLINE=1``) and its cache (``HF_HOME``) are honoured.

    Raises:
        BadInputError: A malformed id, or the files are neither cached nor downloadable.
    """
    import huggingface_hub

    repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise BadInputError(f"invalid hub id {spec!r}: write hf:ORG/NAME (e.g. hf:facebook/vit-mae-base)")
    folder = None
    for weights in ("*.safetensors", "*.bin"):
        try:
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, revision=revision or None, allow_patterns=["*.json", weights]))
        except Exception as error:  # offline, not cached, unknown repository, gated, network errors
            first = (str(error).strip().splitlines() or [""])[0][:160]
            raise BadInputError(
                f"cannot fetch {spec} from the Hugging Face hub ({type(error).__name__}: {first}); without network, "
                f"download it where there is (huggingface-cli download {repo_id}) and pass the folder, or set "
                "HF_HOME to a cache that holds it") from None
        if _weight_file(folder) is not None:
            return folder
    raise BadInputError(f"{spec} has no model.safetensors or pytorch_model.bin (sharded or not): not a transformers "
                        "model repository")


def _weight_file(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


# ---- config.json ----


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(f"cannot read {path} ({what}): {type(error).__name__}: {error}") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path} ({what}) is not a JSON object")
    return value


def read_transformers_config(folder: Path) -> dict[str, Any]:
    """config.json of a ``save_pretrained`` folder, checked to describe a supported class.

    Raises:
        BadInputError: No config.json, or a class that is not supported (naming the supported ones).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise BadInputError(f"{folder} is a folder without {CONFIG_FILE}: MODEL may be a timm name, a folder written "
                            "by transformers' save_pretrained, or hf:ORG/NAME")
    config = read_json(path, "transformers config")
    transformers_architecture(config)
    return config


def transformers_architecture(config: Mapping[str, Any]) -> str:
    """The class a config describes (its ``architectures``, else the base class of its ``model_type``).

    Raises:
        BadInputError: Any other class.
    """
    names = config.get("architectures") or []
    name = names[0] if isinstance(names, list) and len(names) == 1 else MODEL_TYPES.get(config.get("model_type"))
    if name not in ARCHITECTURES:
        what = (f"class {', '.join(map(str, names))}" if names else f"model_type {config.get('model_type')!r}")
        raise BadInputError(f"transformers {what} is not supported: mimprobe loads {SUPPORTED}")
    return name


def _pair(value: Any, what: str) -> tuple[int, int]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(values) != 2 or not all(isinstance(v, int) and v > 0 for v in values):
        raise BadInputError(f"config.json {what} {value!r} is not a positive size")
    return int(values[0]), int(values[1])


def mlp_ratio_for(width: int, hidden: int) -> float:
    """A ratio ``r`` with ``int(width * r) == hidden`` (timm sizes its MLP as ``int(dim * mlp_ratio)``)."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    while int(width * ratio) > hidden:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def _swiglu_hidden(config: Mapping[str, Any]) -> int:
    """DINOv2's SwiGLU width (transformers Dinov2SwiGLUFFN: two thirds of the MLP, rounded up to a multiple of 8)."""
    hidden = int(config["hidden_size"] * config.get("mlp_ratio", 4))
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def timm_model_args(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """config.json -> (timm model name, ``timm.create_model`` kwargs) of the same network.

    The kwargs are JSON-serialisable; ``layer_norm_eps`` and ``packed_swiglu_mlp`` are resolved by
    `mimprobe.models.loading` into ``norm_layer`` and ``mlp_layer``. ``num_classes`` is that of the class's head (0
    for base models). BEiT-style models with mean pooling end with the pooler's norm (timm's ``fc_norm``); saved
    without a pooler (``Data2VecVisionModel``'s default ``add_pooling_layer=False``) they end with no norm at all,
    which `without_final_norm` tells.

    Raises:
        BadInputError: An unsupported class, activation or option.
    """
    architecture = transformers_architecture(config)
    family = ARCHITECTURES[architecture].family
    width, depth, heads = (int(config[key]) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    image, patch = _pair(config.get("image_size", 224), "image_size"), _pair(config.get("patch_size", 16), "patch_size")
    activation = config.get("hidden_act", "gelu")
    if family == "dinov2" and config.get("use_swiglu_ffn"):
        activation = "silu"
    elif activation not in ACTIVATIONS or (family == "beit" and activation != "gelu"):
        raise BadInputError(f"config.json hidden_act {activation!r} is not supported for {architecture}: mimprobe "
                            f"loads {', '.join(ACTIVATIONS) if family != 'beit' else 'gelu'}")
    kwargs: dict[str, Any] = {
        "img_size": list(image) if image[0] != image[1] else image[0],
        "patch_size": list(patch) if patch[0] != patch[1] else patch[0],
        "in_chans": int(config.get("num_channels", 3)), "embed_dim": width, "depth": depth, "num_heads": heads,
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "num_classes": len(config.get("id2label") or {}) if ARCHITECTURES[architecture].heads else 0,
    }
    if activation in ACTIVATIONS and ACTIVATIONS[activation] != "gelu":
        kwargs["act_layer"] = ACTIVATIONS[activation]
    if family == "beit":
        layer_scale = float(config.get("layer_scale_init_value", 0.1) or 0.0)
        kwargs.update(
            mlp_ratio=mlp_ratio_for(width, int(config.get("intermediate_size", 4 * width))),
            qkv_bias=True,  # transformers' BEiT always has query and value biases (the key has none)
            use_abs_pos_emb=bool(config.get("use_absolute_position_embeddings", False)),
            use_rel_pos_bias=bool(config.get("use_relative_position_bias", False)),
            use_shared_rel_pos_bias=bool(config.get("use_shared_relative_position_bias", False)),
            init_values=layer_scale,  # 0.0: no layer scale (timm.create_model drops None, leaving the name's 0.1)
            global_pool="avg" if config.get("use_mean_pooling", True) else "token")
        return _timm_name(family, width, patch, image), kwargs
    kwargs["qkv_bias"] = bool(config.get("qkv_bias", True))
    if family == "dinov2":
        registers = int(config.get("num_register_tokens", 0) or 0)
        if config.get("use_swiglu_ffn"):
            kwargs.update(packed_swiglu_mlp=True, act_layer="silu",
                          mlp_ratio=mlp_ratio_for(width, 2 * _swiglu_hidden(config)))
        else:
            kwargs["mlp_ratio"] = mlp_ratio_for(width, int(width * config.get("mlp_ratio", 4)))
        kwargs.update(init_values=float(config.get("layerscale_value", 1.0)), reg_tokens=registers,
                      no_embed_class=registers > 0, global_pool="token")
        return _timm_name(family, width, patch, image, registers=registers), kwargs
    kwargs.update(mlp_ratio=mlp_ratio_for(width, int(config.get("intermediate_size", 4 * width))),
                  global_pool="token", class_token=True)
    return _timm_name(family, width, patch, image), kwargs


def without_final_norm(config: Mapping[str, Any], keys: Any) -> bool:
    """Whether a BEiT-style encoder with mean pooling was saved without its pooler, so that it ends with no norm
    (transformers' BeitModel replaces its final layernorm with an identity under ``use_mean_pooling``)."""
    architecture = transformers_architecture(config)
    spec = ARCHITECTURES[architecture]
    return (spec.family == "beit" and bool(config.get("use_mean_pooling", True))
            and f"{spec.prefix}pooler.layernorm.weight" not in keys)


def _timm_name(family: str, width: int, patch: tuple[int, int], image: tuple[int, int], *, registers: int = 0) -> str:
    """A timm name that tells the size (``vit_large_patch16_224``) when timm has one, else the family's base name;
    the kwargs fix every architecture argument either way."""
    import timm

    size = SIZE_WORDS.get(width)
    if size is not None and patch[0] == patch[1]:
        candidate = {
            "vit": f"vit_{size}_patch{patch[0]}_{image[0]}",
            "dinov2": f"vit_{size}_patch{patch[0]}_{f'reg{registers}_' if registers else ''}dinov2",
            "beit": f"beit_{size}_patch{patch[0]}_{image[0]}",
            "deit": f"deit_{size}_distilled_patch{patch[0]}_{image[0]}",
        }[family]
        if timm.is_model(candidate):
            return candidate
    return BASE_NAMES[family]


# ---- weights ----


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` folder: one file, or the shards an index names.

    Raises:
        BadInputError: No weight file, or an index that names a missing shard or a path outside the folder.
    """
    folder = Path(folder)
    first = _weight_file(folder)
    if first is None:
        raise BadInputError(f"{folder} has {CONFIG_FILE} but no weights ({', '.join(WEIGHT_FILES)})")
    if not first.name.endswith(".index.json"):
        return [first]
    weight_map = read_json(first, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{first} has no weight_map: the shard index is damaged")
    shards = sorted(set(map(str, weight_map.values())))
    for shard in shards:
        if Path(shard).name != shard or not (folder / shard).is_file():
            raise BadInputError(f"{first} names shard {shard!r}, which is not a file in {folder}: download the "
                                "missing shards")
    return [folder / shard for shard in shards]


def read_transformers_weights(files: list[Path], notes: list[str] | None = None) -> StateDict:
    """Read the weight files (each through `read_checkpoint`: nothing in them runs) into one state dict.

    Raises:
        CheckpointError: A file holds something other than a flat dict of tensors, or two shards share a key.
    """
    state_dict: StateDict = {}
    for path in files:
        loaded = read_checkpoint(path, notes)
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{path} is not a state dict: a save_pretrained weight file maps names to tensors")
        not_tensors = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
        if not_tensors:
            raise CheckpointError(f"{path} holds {len(not_tensors)} entries that are not tensors ({not_tensors[0]}, "
                                  "...): not a save_pretrained weight file; nothing from it was executed")
        shared = state_dict.keys() & loaded.keys()
        if shared:
            raise CheckpointError(f"{path} repeats {len(shared)} keys of another shard ({sorted(shared)[0]}, ...)")
        state_dict.update(loaded)
    return state_dict


_LAYER_NAMES = (  # transformers layer key (after encoder.layer.{i}.) -> timm block key (after blocks.{i}.)
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."), ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."), ("mlp.weights_in.", "mlp.fc1."), ("mlp.weights_out.", "mlp.fc2."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("lambda_1", "gamma_1"), ("lambda_2", "gamma_2"),
    ("attention.attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
)
_EMBEDDING_NAMES = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.register_tokens": "reg_token", "embeddings.distillation_token": "dist_token",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
}
_FINAL_NORMS = {"layernorm.": "norm.", "pooler.layernorm.": "fc_norm."}
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


def remap_transformers_state_dict(state_dict: Mapping[str, torch.Tensor],
                                  config: Mapping[str, Any]) -> tuple[StateDict, list[str]]:
    """transformers weights -> timm names of the model `timm_model_args` builds (pure: the input is not modified).

    Returns:
        The remapped state dict and notes on what was dropped or folded. Keys it does not know are kept as they
        are, so that the strict load names them.
    """
    architecture = transformers_architecture(config)
    spec = ARCHITECTURES[architecture]
    notes: list[str] = []
    source: StateDict = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if spec.dropped and key.startswith(spec.dropped):
            dropped.append(key)
        elif key.endswith("relative_position_index"):
            continue  # an index buffer that older transformers versions saved; timm computes its own
        else:
            source[key[len(spec.prefix):] if spec.prefix and key.startswith(spec.prefix) else key] = value
    if dropped:
        notes.append(f"{architecture}: kept the encoder, dropped the {len(dropped)} decoder tensors")
    if architecture.startswith("ViTMAE"):
        notes.append("ViTMAE: the encoder sees every patch in order (transformers' random masking and token shuffle "
                     "are pre-training only: its forward with mask_ratio=0 and sorted noise)")

    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in source.items():
        match = _LAYER_KEY.fullmatch(key)
        if match:
            block, rest = int(match.group(1)), match.group(2)
            attention = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            if attention:
                qkv.setdefault(block, {})[f"{attention.group(1)}.{attention.group(2)}"] = value
                continue
            for hf_name, timm_name in _LAYER_NAMES:
                if rest.startswith(hf_name):
                    out[f"blocks.{block}.{timm_name}{rest[len(hf_name):]}"] = value
                    break
            else:
                out[key] = value
            continue
        if key in _EMBEDDING_NAMES:
            out[_EMBEDDING_NAMES[key]] = value
        elif key == "embeddings.mask_token":
            notes.append("dropped the mask token (embeddings.mask_token: used only in masked pre-training)")
        elif key.startswith("pooler.dense."):
            notes.append("dropped the pooler (pooler.dense + tanh on the CLS token: a head, not part of the blocks)")
        elif any(key.startswith(hf) for hf, _ in spec.heads):
            hf, timm_head = next((hf, timm_head) for hf, timm_head in spec.heads if key.startswith(hf))
            out[timm_head + key[len(hf):]] = value
        elif any(key.startswith(hf) for hf in _FINAL_NORMS):
            hf = next(hf for hf in _FINAL_NORMS if key.startswith(hf))
            out[_FINAL_NORMS[hf] + key[len(hf):]] = value
        else:
            out[key] = value
    for block, parts in sorted(qkv.items()):
        out.update(_fuse_qkv(block, parts, beit=spec.family == "beit"))
    notes[:] = list(dict.fromkeys(notes))
    if spec.family == "dinov2" and int(config.get("num_register_tokens", 0) or 0) > 0 and "pos_embed" in out:
        positions = out["pos_embed"]  # (1, 1 + patches, D): CLS position first
        out["cls_token"] = out["cls_token"] + positions[:, :1]
        out["pos_embed"] = positions[:, 1:]
        notes.append("DINOv2 with registers: the CLS position embedding is folded into cls_token (timm adds "
                     "positions to patches only)")
    eps = config.get("layer_norm_eps", 1e-12)
    notes.append(f"built from config.json ({architecture}): layer-norm eps {eps:g} as in transformers")
    return out, notes


def _fuse_qkv(block: int, parts: Mapping[str, torch.Tensor], *, beit: bool) -> StateDict:
    """Separate query/key/value projections -> timm's fused ``qkv`` (rows q, then k, then v). BEiT's key has no
    bias: timm's Beit keeps ``q_bias`` and ``v_bias`` (its ``k_bias`` is a zero buffer)."""
    prefix = f"blocks.{block}.attn."
    missing = [name for name in ("query.weight", "key.weight", "value.weight") if name not in parts]
    if missing:  # left under their own names: the strict load reports them
        return {f"{prefix}{name}": value for name, value in parts.items()}
    out = {f"{prefix}qkv.weight": torch.cat([parts["query.weight"], parts["key.weight"], parts["value.weight"]])}
    if beit:
        for name, timm_name in (("query.bias", "q_bias"), ("value.bias", "v_bias"), ("key.bias", "k_bias")):
            if name in parts:
                out[prefix + timm_name] = parts[name]
    elif {"query.bias", "key.bias", "value.bias"} <= parts.keys():
        out[f"{prefix}qkv.bias"] = torch.cat([parts["query.bias"], parts["key.bias"], parts["value.bias"]])
    else:
        out.update({f"{prefix}{name}": value for name, value in parts.items() if name.endswith("bias")})
    return out


def resample_positions(state_dict: Mapping[str, torch.Tensor], grid: tuple[int, int], *,
                       num_prefix_tokens: int) -> StateDict:
    """Resample ``pos_embed`` (1, prefix + H*W, D) to ``grid`` as transformers does at run time
    (``interpolate_pos_encoding``: bicubic, align_corners=False, no antialias, in float32); pure."""
    from timm.layers import resample_abs_pos_embed

    positions = state_dict.get("pos_embed")
    if positions is None or positions.shape[1] == num_prefix_tokens + grid[0] * grid[1]:
        return dict(state_dict)
    return {**state_dict, "pos_embed": resample_abs_pos_embed(positions, list(grid), num_prefix_tokens=num_prefix_tokens,
                                                              interpolation="bicubic", antialias=False)}


# ---- preprocessor_config.json ----


@dataclass(frozen=True)
class ProcessorTransform:
    """An image processor's evaluation transform: `EvalPreprocessing` plus the input size it produces."""

    preprocessing: EvalPreprocessing
    input_size: int


def _size_value(value: Any, what: str) -> tuple[str, int]:
    """``{"height": h, "width": w}`` / ``{"shortest_edge": s}`` / an int -> (``squash`` or ``shortest``, pixels)."""
    if isinstance(value, int):
        return "squash", value
    if isinstance(value, dict) and "shortest_edge" in value:
        return "shortest", int(value["shortest_edge"])
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        if int(value["height"]) != int(value["width"]):
            raise BadInputError(f"preprocessor_config.json {what} {value} is not square: mimprobe feeds square "
                                "inputs; pass --img-size and --crop-pct")
        return "squash", int(value["height"])
    raise BadInputError(f"preprocessor_config.json {what} {value!r} is not understood: pass --img-size, --crop-pct")


def _crop_pct(crop: int, resize: int) -> float:
    """crop/resize, nudged so that timm's ``floor(crop / crop_pct)`` gives back ``resize`` exactly."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    while math.floor(crop / pct) > resize:
        pct = math.nextafter(pct, 1.0)
    return pct


def preprocessing_from_processor_config(processor: Mapping[str, Any]) -> ProcessorTransform | None:
    """preprocessor_config.json (transformers image processors: ViTImageProcessor, BeitImageProcessor,
    BitImageProcessor, DeiTImageProcessor, ...) -> the same evaluation transform in timm's terms.

    ``size`` with height/width is a resize of both sides (timm ``crop_mode="squash"``), ``shortest_edge`` a resize of
    the shorter side (``center``); ``crop_size`` with ``do_center_crop`` gives ``crop_pct = crop / size``. Returns
    None when rescaling is not the usual 1/255 (the transform cannot be expressed; the caller says so).

    Raises:
        BadInputError: A size that is not square or not understood.
    """
    kind = str(processor.get("image_processor_type") or processor.get("feature_extractor_type") or "image processor")
    if processor.get("do_rescale", True) is False or abs(float(processor.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        return None
    default_resample = 2 if kind.startswith("ViT") else 3  # ViTImageProcessor: bilinear; BEiT, BiT, DeiT: bicubic
    interpolation = PIL_RESAMPLE.get(int(processor.get("resample", default_resample)), "bicubic")
    if processor.get("do_normalize", True):
        mean = tuple(float(v) for v in processor.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in processor.get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mode, resize = _size_value(processor.get("size", 224), "size")
    crops = processor.get("do_center_crop", "crop_size" in processor) and "crop_size" in processor
    crop = _size_value(processor["crop_size"], "crop_size")[1] if crops else resize
    if not processor.get("do_resize", True):
        resize = crop
    crop_mode = "squash" if mode == "squash" else "center"
    resize_text = f"{resize}x{resize}" if mode == "squash" else f"shorter side {resize}"
    source = (f"preprocessor_config.json beside the weights ({kind}: resize {resize_text} {interpolation}"
              f"{f', centre crop {crop}' if crop != resize else ''}, mean {list(mean)}, std {list(std)})")
    preprocessing = EvalPreprocessing(mean=mean, std=std, interpolation=interpolation,
                                      crop_pct=_crop_pct(crop, resize) if crop != resize else 1.0, source=source,
                                      crop_mode=crop_mode)
    if interpolation not in INTERPOLATIONS:
        return None
    return ProcessorTransform(preprocessing=preprocessing, input_size=crop)


__all__ = ["ARCHITECTURES", "Architecture", "ProcessorTransform", "download_hub_model", "is_hub_id",
           "is_transformers_folder", "mlp_ratio_for", "preprocessing_from_processor_config",
           "read_transformers_config", "read_transformers_weights", "remap_transformers_state_dict",
           "resample_positions", "timm_model_args", "transformers_architecture", "weight_files", "without_final_norm"]
