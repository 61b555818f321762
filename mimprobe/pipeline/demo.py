"""`run_demo`: the whole story on built-in data, offline, on a CPU, in minutes: `run_pipeline` on ``demo.toml``.

``demo.toml`` ships inside the package (so an installed mimprobe finds it) and is identical to the repository's
``analyses/demo.toml`` (a test checks it). ``fast=True`` shrinks it to a seconds-long smoke run on synthetic images
(`FAST_OVERRIDES`): it checks that every step works together, and its numbers mean nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .run import PipelineResult, run_pipeline
from .spec import load_spec

DEMO_SPEC = Path(__file__).with_name("demo.toml")
DEFAULT_OUT = "mimprobe-demo"

FAST_OVERRIDES: dict[str, Any] = {
    "name": "demo, fast smoke run (synthetic images, seconds of training: the numbers mean nothing)",
    "model": "test_vit",                     # timm's 6-block, 64-wide test model
    "data": "synthetic:classes=4,train=16,test=40,size=32",
    "img_size": 32,
    "pretrain": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "decoder_dim": 32, "decoder_depth": 1,
                 "decoder_heads": 2},
    "profile": {"metrics": ["knn", "linear", "cluster", "rank"], "pool": ["cls"]},
    "place": {"max_heads": 2},
    "refine": {"epochs_heads": 1, "epochs": 1, "batch_size": 16, "queue_size": 32, "topk": 4,
               "head_dims": [32, 16, 32], "monitor": 0},
    "compare": {"notes": "A smoke run of `mimprobe demo --fast`: a 6-block test model on 64 synthetic training images, one "
                         "epoch of each training step. It shows that every step runs and hands its files to the "
                         "next; its numbers mean nothing."},
}


def run_demo(*, out: str | Path | None = None, fast: bool = False, overwrite: bool = False,
             threads: int | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> PipelineResult:
    """MAE pre-training on scikit-learn's digits → profile → place → NNA refinement → profile → report.

    Args:
        out: The run folder (a re-run skips the finished steps and resumes an interrupted one) [default:
            mimprobe-demo].
        fast: The seconds-long smoke configuration (`FAST_OVERRIDES`) instead of the demo's.
        overwrite: Start again in an ``out`` that holds another run.
        progress, log: As in `run_pipeline`.
    """
    spec = load_spec(DEMO_SPEC)
    if fast:
        spec = spec.with_overrides(FAST_OVERRIDES)
    return run_pipeline(spec, out=out or DEFAULT_OUT, overwrite=overwrite, threads=threads, progress=progress,
                        log=log)
