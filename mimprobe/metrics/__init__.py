"""Block-wise metrics on a FeatureStore: k-NN (FAISS), linear probes, low-shot, clustering, and label-free metrics;
`registry` names them all. Names are imported lazily: the registry and the presets load without torch."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "METRICS": ".registry", "PRESETS": ".knn_presets", "MetricRow": "._rows", "ProfileConfig": ".config",
    "ProfileResult": ".profile", "best_blocks": ".headlines", "carve_validation": "._rows",
    "measure_store": ".profile", "profile_store": ".profile", "FAMILIES": ".registry", "METRIC_INFO": ".registry",
})
