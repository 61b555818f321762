"""One-pass extraction of every block into a resumable on-disk FeatureStore (`extraction.extract`), its options
(`config.ExtractConfig`) and the store (`store.FeatureStore`). Names are imported on first use."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "BlockOutputs": ".blockwise", "ExtractConfig": ".config", "ExtractResult": ".extraction", "extract": ".extraction",
    "store_key": ".extraction", "POOLINGS": "..choices", "pool_tokens": ".pooling", "FeatureStore": ".store",
})
