"""What the stage configs share: names of poolings, store dtypes and precisions, and the text forms of the options
that several stages take (``--pool``, ``--mean``, ``--model-kwargs``). Imports nothing heavy (no torch), so that
the command line builds its options without loading a model library."""

from __future__ import annotations

import json
from typing import Any

from .errors import BadInputError

POOLINGS = ("cls", "mean", "cls+mean")   # token pooling of a block's output (`mimprobe.features.pooling`)
# where a block is read (`mimprobe.features.points`): its output, or a point inside it, in the block's forward order
POINTS = ("block", "norm1", "attn", "norm2", "mlp_hidden", "mlp")
STORE_DTYPES = ("float16", "float32")    # feature store arrays (`mimprobe.features.store`)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")   # compute precision (`mimprobe._device`)


def parse_poolings(text: str) -> tuple[str, ...]:
    """``--pool``: ``"cls,mean"`` -> ("cls", "mean"); ``"all"`` -> every pooling.

    Raises:
        BadInputError: An unknown pooling or an empty list.
    """
    if text.strip() == "all":
        return POOLINGS
    poolings = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown or not poolings:
        raise BadInputError(f"unknown pooling {unknown[0] if unknown else text!r}: use {', '.join(POOLINGS)}, "
                            "a comma list of them, or all")
    return poolings


def parse_points(text: str) -> tuple[str, ...]:
    """``--points``: ``"attn,block"`` -> ("block", "attn") (in `POINTS` order, so that the order typed does not make
    another store); ``"all"`` -> every point.

    Raises:
        BadInputError: An unknown point or an empty list.
    """
    if text.strip() == "all":
        return POINTS
    points = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(points - set(POINTS))
    if unknown or not points:
        raise BadInputError(f"unknown point {unknown[0] if unknown else text!r}: use {', '.join(POINTS)}, a comma "
                            "list of them, or all")
    return tuple(point for point in POINTS if point in points)


def parse_channel_values(text: str | None, option: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` (or one number for all channels) → three floats; None stays None."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BadInputError(f"invalid {option} {text!r}: give one or three numbers, e.g. 0.485,0.456,0.406") from None
    return values


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs``: a JSON object (``{"class_token": false}``) or ``key=value`` pairs separated by commas
    (``class_token=false,global_pool=avg,depth=4``; values are read as JSON when they parse, else as strings).

    Raises:
        BadInputError: Neither form.
    """
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise BadInputError(f"invalid --model-kwargs {text!r}: not a JSON object ({error.msg})") from None
        if not isinstance(value, dict):
            raise BadInputError(f"invalid --model-kwargs {text!r}: give a JSON object or key=value pairs")
        return value
    kwargs: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise BadInputError(f"invalid --model-kwargs {text!r}: write key=value pairs separated by commas, e.g. "
                                "class_token=false,global_pool=avg (or a JSON object)")
        lowered = raw.lower()
        if lowered in ("true", "false", "none", "null"):
            kwargs[key] = {"true": True, "false": False}.get(lowered)
        else:
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
    return kwargs
