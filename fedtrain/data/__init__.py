"""Datasets and their split among clients."""

from fedtrain.data.dataset import Dataset, load_dataset
from fedtrain.data.partition import partition

__all__ = ["Dataset", "load_dataset", "partition"]
