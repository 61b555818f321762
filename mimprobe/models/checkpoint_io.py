"""Reading checkpoint files safely: safetensors, or pickles with ``weights_only=True`` (no code ever runs)."""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, CheckpointError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

# Classes allowed in weights_only unpickling besides tensors and containers. argparse.Namespace holds the
# arguments of fairseq (data2vec 2.0) and DeiT/MAE checkpoints; rebuilding it only sets attributes.
SAFE_GLOBALS = [argparse.Namespace]


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file onto the CPU without running code from it.

    ``.safetensors`` files are read with safetensors; everything else with ``torch.load(weights_only=True)``.

    Raises:
        BadInputError: The file is missing.
        CheckpointError: The file is unreadable, or unpickling it would need classes that could run code
            (it is refused and nothing from it is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint {path} not found: give the path of a .pth/.pt/.bin/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:
            raise CheckpointError(f"cannot read {path} as safetensors: {_one_line(error)}") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = _unsafe_globals(path) or re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
        if not names and "Unsupported global" not in str(error):
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or damaged "
                                  f"({type(error).__name__}); check the file or download it again") from None
        needs = f"it needs {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}" if names else _one_line(error)
        raise CheckpointError(
            f"refusing to load {path}: unpickling it could run code ({needs}); nothing from it was executed. "
            "If you trust it, re-save only its tensors (torch.save(state_dict) or safetensors) and pass that file"
        ) from None
    except Exception as error:  # RuntimeError, EOFError, BadZipFile, KeyError, ... from a damaged or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(error)} (is the file complete?)") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) pickles are not inspectable this way
        return []


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
