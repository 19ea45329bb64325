"""Datasets, dot-annotation readers and synthetic cell images."""
from .datasets import DATASETS, TEST_SIZE, DotDataset, load_dataset, read_dots, read_image

__all__ = ["DATASETS", "TEST_SIZE", "DotDataset", "load_dataset", "read_dots", "read_image"]
