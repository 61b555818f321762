"""The options of every stage, declared once (`mimprobe.options`): a frozen config dataclass per stage, and the
commands that take them. The command line, the TOML specs and the Python entry points are derived from these
classes. Nothing here imports torch, so building the command line stays fast."""

from .commands import (COMMANDS, COMPARE, EXTRACT, INFO, PLACE, PREPROCESSING, PRETRAIN, PROFILE, REFINE, Command,
                       CompareRun, ExtractRun, PipelineRun, PlaceRun, PretrainRun, ProfileRun, RefineRun, Running,
                       Weights)
from .common import POOLINGS, PRECISIONS, STORE_DTYPES
from .compare import CompareConfig
from .extract import ExtractConfig
from .place import PlaceConfig
from .pretrain import MaeConfig
from .profile import METRICS, PRESETS, ProfileConfig
from .refine import HEAD_INITS, RefineConfig

__all__ = ["COMMANDS", "COMPARE", "EXTRACT", "HEAD_INITS", "INFO", "METRICS", "PLACE", "POOLINGS", "PRECISIONS",
           "PREPROCESSING", "PRESETS", "PRETRAIN", "PROFILE", "REFINE", "STORE_DTYPES", "Command", "CompareConfig",
           "CompareRun", "ExtractConfig", "ExtractRun", "MaeConfig", "PipelineRun", "PlaceConfig", "PlaceRun", "PretrainRun",
           "ProfileConfig", "ProfileRun", "RefineConfig", "RefineRun", "Running", "Weights"]
