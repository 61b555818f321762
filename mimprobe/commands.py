"""The commands' options: which config classes each command takes (`Command`), and the few options that belong to a
command rather than to a stage (its output folder, the starting weights, threads and progress). `mimprobe.cli`
builds each Typer command from its `Command`, `mimprobe.pipeline.api` builds and validates the configs from the
same entry, and `mimprobe.pipeline.spec` reads the spec sections of the same classes."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass
from typing import Any

from ._run_folder import check_resume_overwrite
from .choices import parse_model_kwargs
from .errors import BadInputError
from .features.config import ExtractConfig
from .metrics.config import ProfileConfig
from .options import build_config, device_option, option, option_fields, public_name, split_options, threads_option
from .placement.config import PlaceConfig
from .pretrain.config import MaeConfig
from .refinement.config import RefineConfig
from .report.config import CompareConfig


def _model_kwargs(text: str) -> dict[str, Any] | None:
    return parse_model_kwargs(text) or None


@dataclass(frozen=True)
class Weights:
    """The starting weights of a model name."""

    checkpoint: str | None = option(None, "Checkpoint file: timm, MAE, data2vec 2.0, MIM-Refiner, DINO/DINOv2, "
                                          "I-JEPA, a plain state dict (.pth/.pt/.bin/.safetensors) [default: none: "
                                          "a seeded random init, or --pretrained].", short="-c")
    pretrained: bool = option(False, "Download timm's pretrained weights (needs the network once).")
    model_kwargs: dict[str, Any] | None = option(None, "timm.create_model arguments: key=value,... or JSON, e.g. "
                                                       "class_token=false,global_pool=avg (part of a store's key).",
                                                 parse=_model_kwargs)


@dataclass(frozen=True)
class Running:
    """How a command runs (not what it computes)."""

    threads: int | None = threads_option()
    progress: bool = option(True, "Progress bars on stderr; --no-progress hides them.", spec=False)


@dataclass(frozen=True)
class ExtractRun:
    out: str = option(MISSING, "Folder that holds feature stores (one sub-folder per key).", short="-o")


@dataclass(frozen=True)
class ProfileRun:
    out: str = option(MISSING, "Folder for profile.csv/.parquet/.json/.png and predictions.npz.", short="-o")
    features: str | None = option(None, "Folder of feature stores [default: OUT/features].")


@dataclass(frozen=True)
class PlaceRun:
    out: str | None = option(None, "Placement file, or a folder for placement.json [default: "
                                   "PROFILE/placement.json].", short="-o")


@dataclass(frozen=True)
class RefineRun:
    out: str = option(MISSING, "Run folder (checkpoints, logs, refined.safetensors).", short="-o")
    placement: str | None = option(None, "placement.json from `mimprobe place`.")
    auto: bool = option(False, "Profile the blocks with k-NN, then place the heads (the place options apply).")
    device: str = device_option()
    resume: bool = option(False, "Continue the run in OUT from its last checkpoint.")
    overwrite: bool = option(False, "Start again in an OUT that holds another run.")

    def __post_init__(self) -> None:
        check_resume_overwrite(resume=self.resume, overwrite=self.overwrite)


@dataclass(frozen=True)
class PretrainRun:
    out: str = option(MISSING, "Folder for the run's files (mae.pth, log.csv, ...).", short="-o")
    resume: bool = option(False, "Continue the run in OUT from its last epoch.")
    overwrite: bool = option(False, "Replace another run's files in OUT.")

    def __post_init__(self) -> None:
        check_resume_overwrite(resume=self.resume, overwrite=self.overwrite)


def _labels(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


@dataclass(frozen=True)
class CompareRun:
    out: str = option(MISSING, "Report folder.", short="-o")
    labels: tuple[str, ...] | None = option(None, "Comma list of names, one per profile [default: the folder "
                                                  "names].", parse=_labels)
    placement: str | None = option(None, "placement.json of the refinement [default: beside the after profile's "
                                         "checkpoint].")
    overwrite: bool = option(False, "Write into a folder that holds other files.")


# The preprocessing options `mimprobe info` shares with extraction.
PREPROCESSING = ("img_size", "mean", "std", "interpolation", "crop_pct")


@dataclass(frozen=True)
class Command:
    """A command's option classes, in the order its help lists them; ``only`` limits a class to some options;
    ``defaults`` are the command's own defaults of some options (over the classes')."""

    name: str
    options: tuple[type, ...]
    only: dict[type, tuple[str, ...]] | None = None
    defaults: dict[str, Any] | None = None

    def names(self) -> list[str]:
        """Every keyword the command takes (besides its arguments)."""
        seen: dict[str, None] = {}
        for cls in self.options:
            allowed = (self.only or {}).get(cls)
            for f, _ in option_fields(cls):
                if allowed is None or public_name(f) in allowed:
                    seen[public_name(f)] = None
        return list(seen)

    def configs(self, options: dict[str, Any]) -> dict[type, Any]:
        """Every option class built from ``options`` (validated: unknown names and bad values raise).

        Raises:
            BadInputError: A name the command does not take (with the closest one), or a bad value.
        """
        known = self.names()
        unknown = [name for name in options if name not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
            raise BadInputError(f"{self.name} has no option {unknown[0]!r}" + (
                f" (did you mean {close[0]}?)" if close else f": it takes {', '.join(known)}"))
        routed = split_options(self.options, {**(self.defaults or {}), **options})
        return {cls: build_config(cls, routed[cls]) for cls in self.options}


EXTRACT = Command("extract", (ExtractRun, Weights, ExtractConfig, Running))
# profile measures both poolings unless told otherwise (extract stores the CLS token alone by default)
PROFILE = Command("profile", (ProfileRun, Weights, ProfileConfig, ExtractConfig, Running),
                  defaults={"pool": ("cls", "mean")})
PLACE = Command("place", (PlaceRun, PlaceConfig))
REFINE = Command("refine", (RefineRun, Weights, RefineConfig, PlaceConfig, Running),
                 only={PlaceConfig: ("max_heads", "freeze", "metric", "pooling", "plateau")})
PRETRAIN = Command("pretrain-mae", (PretrainRun, Weights, MaeConfig, Running))
COMPARE = Command("compare", (CompareRun, CompareConfig, Running), only={Running: ("threads",)})
INFO = Command("info", (Weights, ExtractConfig, Running), only={ExtractConfig: PREPROCESSING, Running: ("threads",)})
COMMANDS = {command.name: command for command in (EXTRACT, PROFILE, PLACE, REFINE, PRETRAIN, COMPARE, INFO)}


@dataclass(frozen=True)
class PipelineRun:
    """The options of `mimprobe run` and `mimprobe demo` (the analysis itself is the spec's)."""

    out: str | None = option(None, "Run folder [default: the spec's out; mimprobe-demo for the demo].", short="-o")
    overwrite: bool = option(False, "Start again from nothing in a run folder that holds a run (the pipeline's own "
                                    "files there are deleted).")
    fast: bool = option(False, "demo: a seconds-long smoke run on synthetic images (its numbers mean nothing).")
    threads: int | None = threads_option()
    progress: bool = option(True, "Progress bars on stderr; --no-progress hides them.")
