"""Image data sources behind one function, and the model-derived evaluation transform."""

from .readers import ImageReader
from .sources import DataSource, Split, load_data
from .transforms import build_eval_transform, resolve_eval_data_config
from .dataset import SplitDataset

__all__ = [
    "DataSource",
    "ImageReader",
    "Split",
    "SplitDataset",
    "build_eval_transform",
    "load_data",
    "resolve_eval_data_config",
]
