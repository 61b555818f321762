"""The whole pipeline from a declarative TOML spec (`mimprobe run`), and the offline demo (`mimprobe demo`).

    pretrain (optional) → profile before → place → refine → profile after → compare

`api` holds the Python entry point of every command (the CLI and the spec call them), `spec` the spec's
layout (derived from the commands' config classes) and their loading and validation (`load_spec`), `run` the orchestration
(`run_pipeline`: one folder per step under the run folder, finished steps skipped, interrupted ones resumed),
`demo` the demo (`run_demo`: `run_pipeline` on the packaged ``demo.toml``, which equals ``analyses/demo.toml``).
"""

from ..commands import COMMANDS
from .api import compare, extract, info, place, pretrain_mae, profile, refine
from .demo import DEMO_SPEC, FAST_OVERRIDES, run_demo
from .run import STEPS, PipelineResult, StepRecord, run_pipeline
from .spec import SECTIONS, Spec, dump_spec, load_spec, spec_from_dict, spec_from_text

__all__ = ["COMMANDS", "DEMO_SPEC", "FAST_OVERRIDES", "SECTIONS", "STEPS", "PipelineResult", "Spec", "StepRecord",
           "compare", "dump_spec", "extract", "info", "load_spec", "place", "pretrain_mae", "profile", "refine",
           "run_demo", "run_pipeline", "spec_from_dict", "spec_from_text"]
