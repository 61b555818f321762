"""Block-wise metrics on a FeatureStore: k-NN (FAISS), linear probes, low-shot, clustering, effective rank."""

from ._rows import MetricRow, carve_validation
from .headlines import best_blocks
from .profile import METRICS, PRESETS, ProfileConfig, ProfileResult, measure_store, profile_store

__all__ = ["METRICS", "PRESETS", "MetricRow", "ProfileConfig", "ProfileResult", "best_blocks", "carve_validation",
           "measure_store", "profile_store"]
