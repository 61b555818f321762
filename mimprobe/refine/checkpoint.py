"""Training checkpoints (exact resume) and the export of the refined encoder as a plain timm state dict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError

CHECKPOINT = "checkpoint-last.pth"
EXPORT = "refined.safetensors"
EXPORT_INFO = "refined.json"


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (a crash mid-write leaves the previous one intact).

    ``state`` holds tensors, state dicts and plain Python values only, so it loads with ``weights_only=True``.
    """
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_training_state` (``weights_only=True``: nothing in it can run code)."""
    if not path.is_file():
        raise BadInputError(f"--resume but {path} does not exist: run without --resume to start, or point --out at "
                            "the run to continue")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged file: one line, not a traceback
        raise BadInputError(f"cannot read training checkpoint {path} ({type(error).__name__}): delete it and "
                            "start again without --resume") from None


def export_encoder(state_dict: dict[str, torch.Tensor], out: Path, info: dict[str, Any]) -> Path:
    """Save an encoder state dict (timm names) as safetensors, with a JSON note on how to load it.

    The file loads strictly with ``mimprobe extract MODEL DATA --checkpoint FILE`` and with
    ``timm.create_model(MODEL, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=FILE))``.
    """
    from safetensors.torch import save_file

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    path = out / EXPORT
    partial = path.with_name(path.name + ".partial")
    metadata = {"format": "timm", "model": str(info.get("model", ""))}
    if info.get("data_config") is not None:  # the preprocessing it was refined with: `load_model` reuses it
        metadata["data_config"] = json.dumps(info["data_config"])
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return path
