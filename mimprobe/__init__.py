"""mimprobe: profile every block of a vision transformer, place refinement heads from the profile, refine, compare.

Public API::

    from mimprobe import extract, FeatureStore, load_model, load_data
    result = extract("vit_tiny_patch16_224", "digits", out="features", img_size=32)
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

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(_import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mimprobe' has no attribute {name!r}")
