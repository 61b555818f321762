"""One-pass extraction of every block into a resumable on-disk FeatureStore."""

from .blockwise import BlockOutputs
from .extract import ExtractConfig, ExtractResult, extract, store_key
from .pooling import POOLINGS, pool_tokens
from .store import FeatureStore

__all__ = ["POOLINGS", "BlockOutputs", "ExtractConfig", "ExtractResult", "FeatureStore", "extract", "pool_tokens",
           "store_key"]
