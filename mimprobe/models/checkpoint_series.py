"""Checkpoint series: the files `mimprobe profile --checkpoint` profiles one after another, in training order.

A series is given as

* a glob (``--checkpoint 'run/checkpoint-*.pth'``): every file it matches (those with a number in their name when
  some have one: ``checkpoint-last.pth``, a training run's resume copy of an epoch, is left out), or
* a run folder holding ``checkpoint-<N>.<ext>`` files (``mimprobe pretrain-mae --save-every N`` writes
  ``checkpoint-{epoch}.pth``): its numbered checkpoints only (``checkpoint-last.pth``, the resume file, is left out).

Order: the integer at the end of each file's stem (the epoch or step: ``checkpoint-10`` after ``checkpoint-9``,
numerically, not lexically), then files without a number by name. Every file must hold the same architecture (the
same tensor names and shapes after the format's remap, `convert_checkpoint`), checked before anything is written.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError
from .checkpoint_io import read_checkpoint
from .remap import convert_checkpoint

GLOB_CHARACTERS = "*?["
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class SeriesCheckpoint:
    """One file of a series: its path, its name in tables and figures (unique in the series) and its number (the
    epoch or step in its name; None without one)."""

    path: Path
    name: str
    step: int | None


def is_checkpoint_series(checkpoint: str | None) -> bool:
    """Whether ``--checkpoint`` names a series: a glob, or a folder holding ``checkpoint-*`` files (a folder without
    any is left to the single-checkpoint readers: a transformers ``save_pretrained`` folder)."""
    if checkpoint is None:
        return False
    text = str(checkpoint)
    if any(character in text for character in GLOB_CHARACTERS) and not Path(text).exists():
        return True
    folder = Path(text)
    return folder.is_dir() and any(path.is_file() for path in folder.glob("checkpoint-*"))


def resolve_checkpoint_series(checkpoint: str) -> list[SeriesCheckpoint]:
    """The files of a series in training order (module docstring).

    Raises:
        BadInputError: A glob that matches no file, or a folder without numbered checkpoints.
    """
    text = str(checkpoint)
    folder = Path(text)
    if folder.is_dir():
        paths = [path for path in folder.glob("checkpoint-*") if path.is_file()
                 and path.suffix in CHECKPOINT_SUFFIXES and _NUMBERED.match(path.stem)]
        if not paths:
            raise BadInputError(f"--checkpoint {folder} is a run folder without numbered checkpoints "
                                "(checkpoint-<epoch>.pth): pre-train with `mimprobe pretrain-mae --save-every 1`, or "
                                "give one checkpoint file")
    else:
        paths = [Path(path) for path in glob.glob(text) if Path(path).is_file()]
        if not paths:
            raise BadInputError(f"--checkpoint {text} matches no file: check the pattern (quote it so the shell does "
                                "not expand it), or give a run folder of checkpoint-<epoch>.pth files")
        if any(_step(path) is not None for path in paths):  # checkpoint-last.pth: the resume copy of an epoch
            paths = [path for path in paths if _step(path) is not None]
    return _named(sorted(paths, key=_order))


def _step(path: Path) -> int | None:
    match = _TRAILING_NUMBER.search(path.stem)
    return int(match.group(1)) if match else None


def _order(path: Path) -> tuple[int, int, str]:
    step = _step(path)
    return (0, step, str(path)) if step is not None else (1, 0, str(path))


def _named(paths: list[Path]) -> list[SeriesCheckpoint]:
    """File stems as names; where stems repeat (a glob over several folders), the folder is kept in the name."""
    stems = [path.stem for path in paths]
    names = [stem if stems.count(stem) == 1 else f"{path.parent.name}/{stem}" for path, stem in zip(paths, stems)]
    if len(set(names)) != len(names):
        names = [str(path) for path in paths]
    return [SeriesCheckpoint(path=path, name=name, step=_step(path)) for path, name in zip(paths, names)]


def check_same_architecture(series: list[SeriesCheckpoint]) -> None:
    """Every checkpoint holds the first one's tensors (names and shapes after the remap of its format).

    Reads each file once with the safe reader (`read_checkpoint`: nothing in it runs).

    Raises:
        BadInputError: An unreadable file, or two checkpoints of different architectures (naming both and the first
            tensors that differ).
    """
    reference: dict[str, tuple[int, ...]] | None = None
    for item in series:
        converted = convert_checkpoint(read_checkpoint(item.path))
        shapes = {key: tuple(value.shape) for key, value in converted.state_dict.items()}
        if reference is None:
            reference, first = shapes, item
            continue
        differ = sorted(set(reference) ^ set(shapes)) + sorted(
            f"{key} {reference[key]} vs {shapes[key]}" for key in set(reference) & set(shapes)
            if reference[key] != shapes[key])
        if differ:
            raise BadInputError(f"the checkpoint series mixes architectures: {item.path} and {first.path} differ in "
                                f"{len(differ)} tensors ({', '.join(differ[:3])}): give checkpoints of one run")
