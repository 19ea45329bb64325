"""Datasets, dot-annotation readers and synthetic cell images."""
from . import synth
from .datasets import DATASETS, TEST_SIZE, DotDataset, load_dataset, read_dots, read_image
from .points import read_points, read_regions
from .regions import SlideRegionDataset, load_slide_regions

__all__ = ["DATASETS", "TEST_SIZE", "DotDataset", "load_dataset", "read_dots", "read_image", "read_points",
           "read_regions", "SlideRegionDataset", "load_slide_regions", "synth"]
