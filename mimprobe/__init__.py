"""mimprobe: profile every block of a vision transformer, place refinement heads from the profile, refine, compare.

Public API::

    import mimprobe
    result = mimprobe.extract("vit_tiny_patch16_224", "digits", out="features", img_size=32)
    profiled = mimprobe.profile(result.store.path, out="profiles/digits", metrics="knn,linear", threads=1)
    placement = mimprobe.place("profiles/digits", max_heads=4)
    x = mimprobe.FeatureStore.open(result.store.path).features("train", block=11, pooling="cls")

Each verb is the command of the same name (`mimprobe.pipeline.api`): the same options as keywords (the CLI's names,
Python values or the CLI's text forms), the same validation, the same result.

Names are imported lazily, so ``mimprobe --help`` does not wait for torch.
"""

from importlib import import_module as _import_module
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("mimprobe")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_EXPORTS = {
    "BadInputError": "errors",
    "CheckpointError": "errors",
    "MimprobeError": "errors",
    "parse_block_spec": "blocks",
    "resolve_blocks": "blocks",
    "DataSource": "data",
    "load_data": "data",
    "ExtractConfig": "features",
    "ExtractResult": "features",
    "FeatureStore": "features",
    "LoadedModel": "models",
    "describe_model": "models",
    "load_model": "models",
    "ProfileConfig": "metrics",
    "ProfileResult": "metrics",
    "profile_store": "metrics",
    "MaeConfig": "pretrain",
    "run_pretrain_mae": "pretrain",
    "Placement": "placement",
    "RefineConfig": "refinement",
    "RefineResult": "refinement",
    "run_refine": "refinement",
    "PlaceConfig": "placement",
    "load_placement": "placement",
    "run_place": "placement",
    "CompareConfig": "report",
    "CompareResult": "report",
    "run_compare": "report",
    "run_demo": "pipeline",
    "run_pipeline": "pipeline",
}

# The commands' Python entry points (`mimprobe.pipeline.api`): ``mimprobe.profile(target, data, out=..., ...)``.
_ALIASES = {name: ("pipeline.api", name) for name in ("extract", "profile", "place", "refine", "compare",
                                                      "pretrain_mae", "info")}
_ALIASES.update({"run_extract": ("features", "extract"), "run_profile": ("pipeline.profiling", "run_profile"),
                 "place_table": ("placement", "place")})

__all__ = sorted([*_EXPORTS, *_ALIASES, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _ALIASES:
        module, attribute = _ALIASES[name]
        return getattr(_import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'mimprobe' has no attribute {name!r}")
