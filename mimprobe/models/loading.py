"""Create a timm model from a name, pretrained weights or a checkpoint file, always loading strictly."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm, SwiGLUPacked

from ..errors import BadInputError, CheckpointError, DownloadError
from . import transformers_format as hf_format
from .checkpoint_io import read_checkpoint, sha256_file
from .families import block_layout
from .postnorm import PostNormBlock
from .preprocessing import EvalPreprocessing, format_preprocessing, recorded_preprocessing
from .remap import convert_checkpoint


@dataclass
class LoadedModel:
    """A model in eval mode with the identity of its weights.

    Attributes:
        model: The timm model (eval mode, on the CPU).
        name: timm name, with the pretrained tag if one was given (``vit_base_patch16_224.mae``).
        weights: ``random`` (seeded init), ``pretrained`` or ``checkpoint``.
        checkpoint: Path of the checkpoint file, if any.
        checkpoint_sha256: Its sha256.
        checkpoint_format: Detected format (see `mimprobe.models.remap`).
        model_kwargs: Architecture arguments passed to ``timm.create_model`` (JSON-serialisable).
        init_seed: Seed of the random initialisation (only meaningful for ``weights == "random"``).
        notes: Remap notes for the user.
        preprocessing: The evaluation preprocessing the weights call for (recorded in a mimprobe export, or that
            of the detected checkpoint family); None: the timm model's own data config.
    """

    model: nn.Module
    name: str
    weights: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_format: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    notes: tuple[str, ...] = ()
    preprocessing: EvalPreprocessing | None = None

    def identity(self) -> dict[str, Any]:
        """What identifies the weights (goes into the FeatureStore key)."""
        ident = {"name": self.name, "weights": self.weights, "model_kwargs": self.model_kwargs}
        if self.weights == "checkpoint":
            ident["checkpoint_sha256"] = self.checkpoint_sha256
        if self.weights == "random":
            ident["init_seed"] = self.init_seed
        return ident

    def eval_data_config(self, *, img_size: int | None = None, crop_pct: float | None = None,
                         mean: Any = None, std: Any = None, interpolation: str | None = None) -> tuple[dict[str, Any], str]:
        """The evaluation data config of these weights and one line saying where it comes from.

        Order: explicit overrides, then the preprocessing the checkpoint calls for, then timm's config of the model.
        """
        from .preprocessing import data_config_source, resolve_eval_data_config

        config = resolve_eval_data_config(self.model, img_size=img_size, crop_pct=crop_pct,
                                          preprocessing=self.preprocessing, mean=mean, std=std,
                                          interpolation=interpolation)
        overrides = [option for option, value in (("--mean", mean), ("--std", std), ("--interpolation", interpolation),
                                                  ("--crop-pct", crop_pct)) if value is not None]
        return config, data_config_source(self.preprocessing, model_name=self.name, img_size=img_size,
                                          overrides=overrides)


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    arch = name.split(".")[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list names with timm.list_models('vit_*')"
    raise BadInputError(f"unknown model name {name!r}: not a timm model{hint}")


def resolve_model_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """JSON model kwargs -> ``timm.create_model`` kwargs: markers for what JSON cannot hold become classes."""
    kwargs = dict(model_kwargs)
    if kwargs.pop("post_norm_blocks", False):
        kwargs["block_fn"] = PostNormBlock
    eps = kwargs.pop("layer_norm_eps", None)
    if eps is not None:  # transformers' exact eps (1e-12 in ViT/BEiT; timm's default is 1e-6)
        kwargs["norm_layer"] = functools.partial(LayerNorm, eps=float(eps))
    if kwargs.pop("packed_swiglu_mlp", False):  # DINOv2-giant's SwiGLU (fc1 holds gate and value, gate first)
        kwargs["mlp_layer"] = SwiGLUPacked
    kwargs.pop("head_norm", None)  # applied to the built model (`_apply_head_norm`)
    return kwargs


def _apply_head_norm(model: nn.Module, model_kwargs: dict[str, Any]) -> None:
    """``head_norm=False``: the weights end without the norm of timm's head (ConvNeXt V2 FCMAE encoders), so it is
    removed with timm's ``reset_classifier(reset_other=True)`` rather than left at its initialisation (which
    ``--norm final`` would then apply as if it were trained)."""
    if model_kwargs.get("head_norm", True) is False:
        model.reset_classifier(0, reset_other=True)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_hub_reachable():
    """Use the hub's offline mode (local cache only) when it cannot be reached, so a machine without network fails
    at once with one message instead of minutes of retries, and cached weights still load."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _create(name: str, *, pretrained: bool, kwargs: dict[str, Any], pretrained_file: str | None) -> nn.Module:
    extra: dict[str, Any] = {}
    if pretrained_file is not None:
        extra["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    downloads = pretrained and pretrained_file is None
    try:
        with _offline_unless_hub_reachable() if downloads else contextlib.nullcontext():
            return timm.create_model(name, pretrained=pretrained, **kwargs, **extra)
    except TypeError as error:
        if "img_size" in kwargs and "img_size" in str(error):
            # convolutional models (ConvNeXt, CNNs) take any input size and no img_size: the size is the transform's
            # alone (the caller's block layout check then refuses the CNNs with their reason)
            without_size = {key: value for key, value in kwargs.items() if key != "img_size"}
            return _create(name, pretrained=pretrained, kwargs=without_size, pretrained_file=pretrained_file)
        raise BadInputError(f"model {name} does not accept {sorted(kwargs)}: {error}") from None
    except (ValueError, AssertionError) as error:  # timm's own checks of architecture arguments
        if pretrained:
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise BadInputError(f"model {name} cannot be built with {kwargs}: {first}") from None
    except FileNotFoundError as error:
        if pretrained_file is not None:
            raise BadInputError(f"pretrained file {pretrained_file} not found") from None
        if pretrained:
            raise DownloadError(_download_message(name, error)) from None
        raise
    except RuntimeError as error:
        if pretrained and "loading state_dict" in str(error):
            source = pretrained_file if pretrained_file is not None else "timm's pretrained file"
            problems = "; ".join(line.strip()[:240] for line in str(error).strip().splitlines()[1:])
            raise CheckpointError(f"{source} does not fit {name}: {problems} "
                                  "Use --checkpoint for files of another layout") from None
        if pretrained and "pretrained" in str(error).lower() and "exist" in str(error).lower():
            raise BadInputError(f"{name} has no pretrained weights in timm: drop --pretrained or pick a tagged "
                                f"name such as vit_base_patch16_224.mae") from None
        if pretrained:
            raise DownloadError(_download_message(name, error)) from None
        raise
    except Exception as error:
        if pretrained:
            raise DownloadError(_download_message(name, error)) from None
        raise


def _download_message(name: str, error: BaseException) -> str:
    from huggingface_hub import constants

    if type(error).__name__ == "LocalEntryNotFoundError" or constants.HF_HUB_OFFLINE:  # offline, nothing cached
        why = (f"the Hugging Face hub is not reachable (or HF_HUB_OFFLINE is set) and its cache "
               f"{constants.HF_HUB_CACHE} holds no copy")
    else:
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
    return (f"could not fetch pretrained weights for {name} ({why}); download them where there is network access "
            "and pass the file with --checkpoint FILE (or copy that hub cache here)")


def _check_blocks(model: nn.Module, name: str) -> None:
    block_layout(model, name)  # raises for models mimprobe cannot profile block by block


def _gap_name(name: str) -> str | None:
    """timm's no-CLS, average-pooled variant of a ViT name (vit_huge_patch14_224 → vit_huge_patch14_gap_224)."""
    arch = name.split(".")[0]
    head, _, size = arch.rpartition("_")
    candidate = f"{head}_gap_{size}" if size.isdigit() else f"{arch}_gap"
    return candidate if timm.is_model(candidate) else None


def _check_class_token(state_dict: dict[str, torch.Tensor], model: nn.Module, name: str, fmt: str) -> None:
    """A checkpoint without a CLS token (I-JEPA) cannot fill a model with one: say which model to use instead
    (timm's resampling of its position table would otherwise fail with a reshape error)."""
    if "cls_token" in state_dict or getattr(model, "cls_token", None) is None or "pos_embed" not in state_dict:
        return
    family = "I-JEPA checkpoint" if fmt == "ijepa" else "checkpoint"
    gap = _gap_name(name)
    use = f"{gap}, or " if gap else "a *_gap_* model (e.g. vit_huge_patch14_gap_224), or "
    raise CheckpointError(f"the {family} has no CLS token but {name} has one: use {use}--model-kwargs "
                          "class_token=false,global_pool=avg,fc_norm=false (and profile it with --pool mean)")


def load_model(name: str, *, checkpoint: str | os.PathLike | None = None, pretrained: bool = False,
               img_size: int | None = None, init_seed: int = 0,
               pretrained_file: str | os.PathLike | None = None,
               model_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Build a timm model and load its weights strictly.

    Args:
        name: timm model name, optionally with a pretrained tag; or a folder written by transformers'
            ``save_pretrained``, or ``hf:ORG/NAME`` (a hub id): the timm model its config.json describes
            (`mimprobe.models.transformers_format`).
        checkpoint: A checkpoint file (.pth/.pt/.bin/.safetensors) in any format `convert_checkpoint` reads, or a
            transformers folder or ``hf:ORG/NAME`` (then ``name`` is a timm name of the same family).
        pretrained: Download timm's pretrained weights (through timm and the Hugging Face hub).
        img_size: Input size to build the model for (position embeddings are resampled by timm's filter).
        init_seed: Seed of the random initialisation when no weights are loaded, so that random-weight runs
            (benchmarks, resumed extractions) are reproducible.
        pretrained_file: A local file to use instead of downloading (timm's ``pretrained_cfg_overlay``).
        model_kwargs: Architecture arguments for ``timm.create_model`` (``--model-kwargs``, e.g.
            ``{"class_token": False, "global_pool": "avg"}``); they override those a checkpoint format sets and are
            part of the model's identity.

    Raises:
        BadInputError: Unknown name, unreadable checkpoint, or a checkpoint of another architecture (the
            message lists missing, unexpected and mis-shaped keys).
        DownloadError: ``pretrained`` and the weights cannot be fetched.
    """
    if checkpoint is not None and (pretrained or pretrained_file is not None):
        raise BadInputError("use either --pretrained or --checkpoint, not both")
    if any(hf_format.is_hub_id(str(value)) or hf_format.is_transformers_folder(value) for value in (name, checkpoint)):
        return _load_transformers(name, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                                  init_seed=init_seed, user_kwargs=dict(model_kwargs or {}))
    _check_name(name)
    size_kwargs = {"img_size": int(img_size)} if img_size is not None else {}
    user_kwargs = dict(model_kwargs or {})
    if not all(isinstance(key, str) and key.isidentifier() for key in user_kwargs):
        raise BadInputError(f"invalid model kwargs {sorted(map(str, user_kwargs))}: keys must be argument names")
    if checkpoint is None:
        pretrained = pretrained or pretrained_file is not None
        model_kwargs = {"num_classes": 0, **user_kwargs}
        # timm loads pretrained weights non-strictly when the head size differs from the file's (num_classes=0),
        # which would leave any missing weight at its random init: build with the pretrained head, load strictly,
        # then drop the head
        create_kwargs = {**user_kwargs, **size_kwargs} if pretrained else {**model_kwargs, **size_kwargs}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = _create(name, pretrained=pretrained, kwargs=create_kwargs, pretrained_file=pretrained_file)
        if pretrained:
            model.reset_classifier(0)
            # timm's FCMAE weights have no head norm and timm loads them non-strictly, leaving it at its init
            # (convnext.py `_create_convnext`): remove it, as for FCMAE checkpoint files
            _apply_head_norm(model, {"head_norm": getattr(model, "pretrained_cfg", {}).get("tag") != "fcmae"})
        _check_blocks(model, name)
        # timm's own weights (or a local file of them): timm's data config of the name applies (preprocessing None)
        return LoadedModel(model=model.eval(), name=name, weights="pretrained" if pretrained else "random",
                           model_kwargs=model_kwargs, init_seed=init_seed)

    path = Path(checkpoint)
    read_notes: list[str] = []
    raw = read_checkpoint(path, read_notes)
    converted = convert_checkpoint(raw)
    recorded = _recorded_data_config(raw, path)
    del raw
    combined_kwargs = {**converted.model_kwargs, **user_kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = _create(name, pretrained=False, kwargs={**resolve_model_kwargs(combined_kwargs), **size_kwargs},
                        pretrained_file=None)
    _apply_head_norm(model, combined_kwargs)
    _check_blocks(model, name)
    _check_class_token(converted.state_dict, model, name, converted.format)
    state_dict = _filter_for_model(converted.state_dict, model)
    load_strict(model, state_dict, source=f"{path} ({converted.format} format)", model_name=name)
    return LoadedModel(model=model.eval(), name=name, weights="checkpoint", checkpoint=str(path),
                       checkpoint_sha256=sha256_file(path), checkpoint_format=converted.format,
                       model_kwargs=combined_kwargs, init_seed=init_seed,
                       notes=(*read_notes, *converted.notes), preprocessing=recorded or format_preprocessing(
                           converted.format))


def _load_transformers(name: str, *, checkpoint: str | os.PathLike | None, pretrained: bool, img_size: int | None,
                       init_seed: int, user_kwargs: dict[str, Any]) -> LoadedModel:
    """A transformers ``save_pretrained`` folder or ``hf:ORG/NAME`` (as MODEL, or as ``--checkpoint`` beside a timm
    name of the same family) as the timm model its config.json describes, loaded strictly
    (`mimprobe.models.transformers_format`). Everything is checked before anything is written."""
    if pretrained:
        raise BadInputError("--pretrained downloads timm's weights: drop it when MODEL or --checkpoint is a "
                            "transformers folder or hf:ORG/NAME")
    if checkpoint is not None and (hf_format.is_hub_id(name) or hf_format.is_transformers_folder(name)):
        raise BadInputError(f"give the transformers model either as MODEL or as --checkpoint, not both ({name}, "
                            f"{checkpoint})")
    source = str(checkpoint) if checkpoint is not None else str(name)
    timm_given = name if checkpoint is not None else None
    if timm_given is not None:
        _check_name(timm_given)
    if hf_format.is_hub_id(source):
        with _offline_unless_hub_reachable():
            folder = hf_format.download_hub_model(source)
    else:
        folder = Path(source)
    config = hf_format.read_transformers_config(folder)  # refuses other classes before any weight is read
    architecture = hf_format.transformers_architecture(config)
    family = hf_format.ARCHITECTURES[architecture].family
    timm_name, config_kwargs = hf_format.timm_model_args(config)
    if timm_given is not None:
        arch = timm_given.split(".")[0]
        module = hf_format.TIMM_MODULES[family]
        if not timm.models.is_model_in_modules(arch, [module]) or (family == "deit") != ("distilled" in arch):
            raise BadInputError(f"{source} is a {architecture}, which timm builds as {timm_name}; {timm_given} is "
                                f"another family: pass {timm_name} (or the folder alone as MODEL)")
        timm_name = arch
    files = hf_format.weight_files(folder)
    notes: list[str] = []
    processor_file = folder / hf_format.PROCESSOR_FILE
    processor = (hf_format.preprocessing_from_processor_config(hf_format.read_json(processor_file, "image processor"))
                 if processor_file.is_file() else None)
    if processor is None:
        notes.append(f"no usable {hf_format.PROCESSOR_FILE} beside the weights: timm's data config of {timm_name} "
                     "applies; pass --mean/--std/--interpolation/--crop-pct for the model's own")
    if img_size is None and processor is not None and processor.input_size != config_kwargs["img_size"]:
        config_kwargs["img_size"] = processor.input_size  # the processor's crop; positions are resampled to it
        notes.append(f"built for {processor.input_size} px, the size of {hf_format.PROCESSOR_FILE} (config.json: "
                     f"{config.get('image_size')}); position embeddings interpolated as transformers does")
    raw = hf_format.read_transformers_weights(files, notes)
    no_final_norm = hf_format.without_final_norm(config, raw.keys())
    state_dict, remap_notes = hf_format.remap_transformers_state_dict(raw, config)
    del raw
    combined_kwargs = {**config_kwargs, **user_kwargs}
    size_kwargs = {"img_size": int(img_size)} if img_size is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = _create(timm_name, pretrained=False, kwargs={**resolve_model_kwargs(combined_kwargs), **size_kwargs},
                        pretrained_file=None)
    if no_final_norm:  # timm's Beit always builds norm or fc_norm; this encoder has neither
        model.norm, model.fc_norm = nn.Identity(), nn.Identity()
        notes.append(f"{architecture} saved without its pooler: the encoder ends with no norm (fc_norm is an "
                     "identity)")
    _check_blocks(model, timm_name)
    grid = tuple(int(side) for side in model.patch_embed.grid_size)
    positions_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    state_dict = hf_format.resample_positions(state_dict, grid, num_prefix_tokens=positions_prefix)
    state_dict = _filter_for_model(state_dict, model)
    load_strict(model, state_dict, source=f"{source} (transformers {architecture})", model_name=timm_name)
    digest = sha256_file(files[0]) if len(files) == 1 else hashlib.sha256(
        "".join(f"{path.name}:{sha256_file(path)}\n" for path in files).encode()).hexdigest()
    return LoadedModel(model=model.eval(), name=timm_name, weights="checkpoint", checkpoint=source,
                       checkpoint_sha256=digest, checkpoint_format=f"transformers {architecture}",
                       model_kwargs=combined_kwargs, init_seed=init_seed, notes=(*notes, *remap_notes),
                       preprocessing=processor.preprocessing if processor is not None else None)


def _recorded_data_config(raw: Any, path: Path) -> EvalPreprocessing | None:
    """The data config a mimprobe export records (``data_config`` beside the weights of a pickle, or in the
    safetensors metadata as JSON): the preprocessing those weights were trained with."""
    import json

    value = raw.get("data_config") if isinstance(raw, dict) else None
    if value is None and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                value = json.loads((handle.metadata() or {}).get("data_config", "null"))
        except (OSError, ValueError):
            value = None
    # the file's name stays out of this text: it goes into the store key, and renaming a file changes no number
    return recorded_preprocessing(value, "recorded in the checkpoint by mimprobe (the data config these weights "
                                         "were trained with)")


def _filter_for_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply the model family's timm ``checkpoint_filter_fn`` (DINOv2 / BEiT conversions, resampling of position
    and patch embeddings to the model's input size). Shape problems it cannot fix surface in the strict load."""
    _check_patch_size(state_dict, model)
    _check_window_size(state_dict, model)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        return filter_fn(state_dict, model)
    except Exception as error:  # a foreign layout can make a filter fail before the strict check explains it
        raise CheckpointError(f"the checkpoint does not fit {type(model).__name__}: "
                              f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def _check_patch_size(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse a checkpoint trained with another patch size: timm's filter would silently resample its patch
    embedding (FlexiViT style) and the strict load would then succeed with weights of another model."""
    weight = state_dict.get("patch_embed.proj.weight")
    target = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "weight", None)
    if weight is None or target is None or weight.ndim != 4 or target.ndim != 4:
        return
    if tuple(weight.shape[-2:]) != tuple(target.shape[-2:]):
        raise CheckpointError(f"the checkpoint's patch size is {tuple(weight.shape[-2:])} but "
                              f"{type(model).__name__} here uses {tuple(target.shape[-2:])}: choose the model name "
                              "with the checkpoint's patch size")


def _check_window_size(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse a Swin checkpoint whose attention windows differ from the model's: timm's filter would silently
    resample its relative position bias tables (SimMIM pre-trains Swin-B with 6x6 windows at 192 px, timm's
    Swin-B names use 7x7 at 224), and the features would be those of another model."""
    if type(model).__name__ != "SwinTransformer":
        return
    expected = model.state_dict()
    for key, value in state_dict.items():
        if key.endswith("relative_position_bias_table") and key in expected and value.shape != expected[key].shape:
            window = (math.isqrt(value.shape[0]) + 1) // 2  # a (2w-1)^2-row table
            raise CheckpointError(f"the checkpoint's attention windows are {window}x{window} ({key} {tuple(value.shape)}"
                                  f") but the model's give {tuple(expected[key].shape)}: build the model with the "
                                  f"checkpoint's window and input size, e.g. --model-kwargs window_size={window} "
                                  "--img-size 192 for SimMIM's 192 px pre-training")


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str, model_name: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that lists missing, unexpected and mis-shaped keys.

    Raises:
        CheckpointError: Any key or shape mismatch.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mis_shaped = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
                  for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} shape mismatches, checkpoint vs model ({_listing(mis_shaped, 3)})")
        raise CheckpointError(f"checkpoint {source} does not fit {model_name}: {'; '.join(parts)}. "
                              "Is it a checkpoint of another architecture? Pass the matching timm model name")
    # NaN/Inf weights would give NaN features with exit 0 (and profile would blame float16 overflow)
    not_finite = [key for key, value in state_dict.items() if value.is_floating_point() and
                  not bool(torch.isfinite(value).all())]
    if not_finite:
        raise CheckpointError(f"checkpoint {source} has NaN or Inf values in {len(not_finite)} tensors "
                              f"({_listing(not_finite)}): the file is damaged or its training diverged; use another "
                              "checkpoint")
    model.load_state_dict(state_dict, strict=True)


def describe_model(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """Structure of a timm model mimprobe profiles: blocks and their widths, prefix tokens, patch size, norms.

    ``embed_dim`` is the width of the last block; ``block_widths`` lists every block's (they differ between the
    stages of hierarchical models) and ``block_modules`` the module each block number reads (``blocks.3``; for
    ConvNeXt and Swin, numbered across stages in forward order: ``stages.1.blocks.0``). ``final_norm`` names the norm the model ends with and ``final_norm_on`` where
    it acts: ``tokens`` (``model.norm``, before pooling) or ``pooled`` (``fc_norm`` / ``head.norm``, after it).

    Raises:
        BadInputError: A model mimprobe cannot profile (see `mimprobe.models.families`).
    """
    from .families import norm_module

    layout = block_layout(model, name or type(model).__name__)
    patch_embed = getattr(model, "patch_embed", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    grid = getattr(patch_embed, "grid_size", None)
    norm_path = layout.token_norm or layout.pooled_norm
    norm = norm_module(model, norm_path)
    return {
        "class": type(model).__name__,
        "num_blocks": layout.num_blocks,
        "embed_dim": layout.block_widths[-1],
        "block_widths": list(layout.block_widths),
        "block_modules": list(layout.block_modules or (f"blocks.{i}" for i in range(layout.num_blocks))),
        "block_output": layout.output,
        "num_prefix_tokens": layout.num_prefix_tokens,
        "has_class_token": layout.has_class_token,
        "num_reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "patch_size": list(patch_size) if isinstance(patch_size, (tuple, list)) else None,
        "grid_size": list(grid) if isinstance(grid, (tuple, list)) else None,
        "final_norm": type(norm).__name__ if norm is not None else None,
        "final_norm_on": None if norm is None else (f"tokens (model.{norm_path})" if layout.token_norm
                                                    else f"pooled vector (model.{norm_path})"),
        "global_pool": getattr(model, "global_pool", None),
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "has_forward_intermediates": hasattr(model, "forward_intermediates"),
    }
