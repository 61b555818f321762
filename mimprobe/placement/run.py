"""I/O of placement: read a profile folder, write placement.json, read it back."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from .._versions import software_versions
from ..errors import BadInputError
from ..head_widths import OFFICIAL_HEAD_DIMS, head_parameters, proportional_head_dims
from ..options import build_config
from .config import PlaceConfig
from .record import Placement
from .rules import place

PLACEMENT_FILE = "placement.json"


def read_profile(profile: str | Path) -> tuple[pd.DataFrame, dict[str, Any], Path]:
    """A profile folder's table (parquet, else csv) and its profile.json (``{}`` when absent).

    Raises:
        BadInputError: No such folder, or no profile table in it.
    """
    folder = Path(profile)
    if folder.is_file() and folder.name in ("profile.parquet", "profile.csv", "profile.json"):
        folder = folder.parent
    if not folder.is_dir():
        raise BadInputError(f"profile folder {folder} not found: give the --out folder of `mimprobe profile`")
    parquet, csv = folder / "profile.parquet", folder / "profile.csv"
    if parquet.is_file():
        table = pd.read_parquet(parquet)
    elif csv.is_file():
        table = pd.read_csv(csv, dtype={"params": str})
    else:
        raise BadInputError(f"{folder} holds no profile.parquet or profile.csv: run `mimprobe profile ... --out "
                            f"{folder}` first")
    meta_path = folder / "profile.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except json.JSONDecodeError as error:
        raise BadInputError(f"{meta_path} is not valid JSON ({error.msg}): re-run `mimprobe profile`") from None
    return table, meta, folder


def model_depth(meta: dict[str, Any], table: pd.DataFrame) -> tuple[int, str]:
    """The model's number of blocks and where it came from: profile.json's model structure, the feature store's
    manifest, or (for a bare table) the largest profiled block + 1."""
    structure = (meta.get("model") or {}).get("structure") or {}
    if structure.get("num_blocks"):
        return int(structure["num_blocks"]), "profile.json"
    store = meta.get("store")
    if store and (Path(store) / "manifest.json").is_file():
        manifest = json.loads((Path(store) / "manifest.json").read_text())
        depth = ((manifest.get("model") or {}).get("structure") or {}).get("num_blocks")
        if depth:
            return int(depth), "the feature store's manifest"
    if table.empty:
        raise BadInputError("the profile table is empty: re-run `mimprobe profile`")
    return int(table["block"].max()) + 1, "the largest profiled block + 1"


def run_place(profile: str | Path, *, out: str | Path | None = None, config: PlaceConfig | None = None,
              preset: str | None = None, k: int | None = None, **options: Any) -> Placement:
    """Read a profile folder, place heads with `place`, write placement.json, and return the placement.

    Args:
        profile: The --out folder of ``mimprobe profile`` (profile.parquet or .csv, and profile.json).
        out: The placement file, or a folder to write placement.json into (default: the profile folder).
        config: The placement options; keyword ``options`` (named as ``mimprobe place``'s options: rule, metric,
            pooling, max_heads, plateau, n, blocks, freeze) override its fields.
        preset, k: The k-NN protocol of the curve when the profile holds several (default: the profile's preset).

    Raises:
        BadInputError: A missing profile, bad options, or an unwritable output.
    """
    config = build_config(PlaceConfig, options, base=config or PlaceConfig())
    options = {**config.place_options(), "preset": preset, "k": k}
    table, meta, folder = read_profile(profile)
    num_blocks, depth_source = model_depth(meta, table)
    options["preset"] = options["preset"] or (meta.get("config") or {}).get("preset")
    options["calibration"] = meta.get("calibration")
    options.setdefault("val_images", validation_images(folder, split="train-loo" if not (
        (table["split"] == "val").any()) else "val"))
    placement = place(table, num_blocks=num_blocks, source=str(folder.resolve()), **options)
    if depth_source != "profile.json":
        placement = _with_note(placement, f"the model depth ({num_blocks} blocks) comes from {depth_source}")
    size_note = head_size_note(len(placement.head_blocks), (meta.get("model") or {}).get("structure") or {})
    if size_note:
        placement = _with_note(placement, size_note)
    target = placement_path(folder, out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")  # write then rename: a kill never leaves half a file
        tmp.write_text(json.dumps({**placement.to_dict(), "versions": software_versions()}, indent=1) + "\n")
        os.replace(tmp, target)
    except OSError as error:
        raise BadInputError(f"cannot write {target}: {error.strerror or error}; choose a writable --out") from None
    return placement


def validation_images(folder: Path, *, split: str) -> int | None:
    """Images of the profile's ``split`` (the rows predictions.npz recorded for it), or None without the file."""
    import numpy as np

    path = folder / "predictions.npz"
    try:
        with np.load(path, allow_pickle=False) as data:  # lazy: reads only the one array
            return int(len(data[f"rows__{split}"])) if f"rows__{split}" in data.files else None
    except (OSError, ValueError):
        return None


HEAD_NOTE_BYTES = 1024 ** 3   # say what the heads cost once checkpoint-last.pth would pass 1 GiB


def _checkpoint_bytes(heads: int, per_head: int, encoder: int) -> int:
    """checkpoint-last.pth in float32: each head's weights and two AdamW moments; the encoder's weights, moments
    and EMA (`mimprobe.refinement.sizing.checkpoint_bytes` counts the same from the real modules)."""
    return 4 * (3 * heads * per_head + 4 * encoder)


def head_size_note(heads: int, structure: dict[str, Any]) -> str | None:
    """A note on the checkpoint size the heads imply when, at refine's official widths (its default on a GPU or
    at 224 px and more), it passes `HEAD_NOTE_BYTES`, with the size at the proportional widths refine takes by
    default on a CPU below 224 px (None below the threshold, or without the model's width)."""
    width, encoder = structure.get("embed_dim"), int(structure.get("num_params") or 0)
    if not width or not heads:
        return None
    official, proportional = OFFICIAL_HEAD_DIMS, proportional_head_dims(int(width))
    per_head = head_parameters(int(width), official)
    size = _checkpoint_bytes(heads, per_head, encoder)
    if size < HEAD_NOTE_BYTES:
        return None
    gib = 1024 ** 3
    share = f", {heads * per_head / encoder:.0f}x the encoder's {encoder / 1e6:.1f} M" if encoder else ""
    small = _checkpoint_bytes(heads, head_parameters(int(width), proportional), encoder)
    widths = "/".join(map(str, proportional))
    return (f"warning: {heads} heads of the official widths ({'/'.join(map(str, official))}, refine's default on a "
            f"GPU or at 224 px and more) hold {heads * per_head / 1e6:.1f} M parameters{share}: refine's "
            f"checkpoint-last.pth will be about {size / gib:.1f} GiB; at the widths proportional to this model "
            f"({widths}, refine's default on a CPU below 224 px, or --head-dims proportional) about "
            f"{small / gib:.2f} GiB; fewer heads with --max-heads")


def placement_path(profile: str | Path, out: str | Path | None = None) -> Path:
    """Where `run_place` writes: ``out`` (a folder gets placement.json inside), else PROFILE/placement.json."""
    profile = Path(profile)
    if profile.is_file():  # profile.parquet given instead of its folder
        profile = profile.parent
    target = profile / PLACEMENT_FILE if out is None else Path(out)
    return target / PLACEMENT_FILE if target.is_dir() else target


def _with_note(placement: Placement, note: str) -> Placement:
    return replace(placement, notes=(*placement.notes, note))


def load_placement(path: str | Path) -> Placement:
    """Read placement.json (a file, or a folder holding one) back, validated.

    Raises:
        BadInputError: A missing file, invalid JSON, or content that is not a placement.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PLACEMENT_FILE
    if not path.is_file():
        raise BadInputError(f"placement file {path} not found: write one with `mimprobe place PROFILE`")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path} is not valid JSON ({error}): write it again with `mimprobe place`") from None
    try:
        return Placement.from_dict(payload)
    except BadInputError as error:
        raise BadInputError(f"{path}: {error}") from None
