"""The whole pipeline from a declarative TOML spec (`mimprobe run`), and the offline demo (`mimprobe demo`).

    pretrain (optional) → profile before → place → refine → profile after → compare

`spec` holds the spec's dataclasses and their loading and validation (`load_spec`), `run` the orchestration
(`run_pipeline`: one folder per step under the run folder, finished steps skipped, interrupted ones resumed),
`demo` the demo (`run_demo`: `run_pipeline` on the packaged ``demo.toml``, which equals ``analyses/demo.toml``).
"""

from .demo import DEMO_SPEC, FAST_OVERRIDES, run_demo
from .run import STEPS, PipelineResult, StepRecord, run_pipeline
from .spec import (CompareSpec, PlaceSpec, PretrainSpec, ProfileSpec, RefineSpec, Spec, dump_spec, load_spec,
                   spec_from_dict, spec_from_text)

__all__ = ["DEMO_SPEC", "FAST_OVERRIDES", "STEPS", "CompareSpec", "PipelineResult", "PlaceSpec", "PretrainSpec",
           "ProfileSpec", "RefineSpec", "Spec", "StepRecord", "dump_spec", "load_spec", "run_demo", "run_pipeline",
           "spec_from_dict", "spec_from_text"]
