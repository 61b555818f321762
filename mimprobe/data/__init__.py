"""Image data sources behind one function, and the evaluation transform of a data config."""

from .readers import ImageReader
from .sources import DataSource, Split, load_data
from .transforms import build_eval_transform
from .dataset import SplitDataset

__all__ = [
    "DataSource",
    "ImageReader",
    "Split",
    "SplitDataset",
    "build_eval_transform",
    "load_data",
]
