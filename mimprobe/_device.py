"""Device and precision, resolved once and passed down (no ``.cuda()`` in library code)."""

from __future__ import annotations

import contextlib

import torch

from .errors import BadInputError

from .choices import PRECISIONS  # noqa: E402  (one definition, with the options)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:i]`` and ``cpu`` as given.

    Raises:
        BadInputError: An unknown device, or ``cuda`` without a visible GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {name} but no CUDA device is visible: use --device cpu or auto")
        return torch.device(name)
    raise BadInputError(f"unknown device {name!r}: use auto, cpu or cuda")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on GPU (autocast), ``fp32`` on CPU."""
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])
