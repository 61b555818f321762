"""Training checkpoints (exact resume) and the export of the refined encoder as a plain timm state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._disk import replaced_atomically, tensor_bytes
from ..errors import BadInputError

CHECKPOINT = "checkpoint-last.pth"
EXPORT = "refined.safetensors"
EXPORT_INFO = "refined.json"


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (a crash or a full disk mid-write leaves the previous one intact; a
    full disk raises `mimprobe._disk.DiskFullError` naming the file and its size).

    ``state`` holds tensors, state dicts and plain Python values only, so it loads with ``weights_only=True``.
    """
    with replaced_atomically(path, needed_bytes=tensor_bytes(state)) as partial:
        torch.save(state, partial)


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


def export_encoder(state_dict: dict[str, torch.Tensor], out: Path, info: dict[str, Any], *, name: str = EXPORT,
                   with_info: bool = True) -> Path:
    """Save an encoder state dict (timm names) as safetensors, with a JSON note on how to load it.

    The file loads strictly with ``mimprobe extract MODEL DATA --checkpoint FILE`` and with
    ``timm.create_model(MODEL, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=FILE))``.
    Identical weights and info give a byte-identical file (`deterministic_safetensors`), so a feature store keyed
    by its hash is found again; it is created with the process's umask like every other file (safetensors' own
    ``save_file`` creates 0600).
    """
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    path = out / name
    metadata = {"format": "timm", "model": str(info.get("model", ""))}
    if info.get("data_config") is not None:  # the preprocessing it was refined with: `load_model` reuses it
        metadata["data_config"] = json.dumps(info["data_config"], sort_keys=True)
    data = deterministic_safetensors(tensors, metadata)
    with replaced_atomically(path, needed_bytes=len(data)) as partial:
        partial.write_bytes(data)
    if with_info:
        write_text_atomic(out / EXPORT_INFO, json.dumps(info, indent=2) + "\n")
    return path


def deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file whose JSON header has its keys sorted.

    safetensors writes its ``__metadata__`` from a Rust HashMap, whose order changes from one process to the next,
    so the same tensors gave different files. The data section (ordered by dtype, then name, by safetensors) is
    kept; only the header is written again: sorted keys, no spaces, padded with spaces to a multiple of 8 bytes as
    the format requires (https://github.com/huggingface/safetensors#format).
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + length:]


def write_text_atomic(path: Path, text: str) -> None:
    """A small text file through a temporary file (a full disk keeps the previous one)."""
    data = text.encode()
    with replaced_atomically(path, needed_bytes=len(data), suffix=".tmp") as partial:
        partial.write_bytes(data)
