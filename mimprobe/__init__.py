"""mimprobe: profile every block of a vision transformer, place refinement heads from the profile, refine, compare.

Public API::

    from mimprobe import extract, FeatureStore, load_model, load_data, profile
    result = extract("vit_tiny_patch16_224", "digits", out="features", img_size=32)
    profiled = profile(result.store.path, out="profiles/digits")   # = run_profile: every block, every metric
    x = FeatureStore.open(result.store.path).features("train", block=11, pooling="cls")

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
    "extract": "features",
    "LoadedModel": "models",
    "describe_model": "models",
    "load_model": "models",
    "ProfileConfig": "metrics",
    "ProfileResult": "metrics",
    "profile_store": "metrics",
    "run_profile": "metrics",
    "MaeConfig": "pretrain",
    "pretrain_mae": "pretrain",
    "Placement": "placement",
    "RefineConfig": "refine",
    "RefineResult": "refine",
    "run_refine": "refine",
    "load_placement": "placement",
    "place": "placement",
    "run_place": "placement",
    "CompareConfig": "report",
    "CompareResult": "report",
    "compare": "report",
    "run_compare": "report",
    "run_demo": "pipeline",
    "run_pipeline": "pipeline",
}

# Verb-named entry points beside extract/place/compare: ``mimprobe.profile(model, data, out=...)`` is run_profile.
_ALIASES = {"profile": ("metrics", "run_profile")}

__all__ = sorted([*_EXPORTS, *_ALIASES, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _ALIASES:
        module, attribute = _ALIASES[name]
        return getattr(_import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'mimprobe' has no attribute {name!r}")
