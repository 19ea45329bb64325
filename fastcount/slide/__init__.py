"""Whole-slide counting: readers, tissue mask, tile plan, engine, outputs.

``count_slide(source, model)`` counts a slide or image of any size tile by
tile and returns a ``SlideCount``; its total equals the whole-image count of
the same model up to float rounding.
"""
from ..system import peak_rss_mb
from .engine import count_slide
from .mask import SlideMask, auto_mask, otsu_threshold
from .plan import DEFAULT_TILE, MIN_TILE, Tile, TilePlan, plan_tiles
from .readers import (ArrayReader, ImageReader, OpenSlideReader, SlideReader, SlideReadError, TiffReader,
                      open_reader)
from .result import SlideCount
from .thumbnail import read_thumbnail

__all__ = ["count_slide", "SlideCount", "open_reader", "SlideReader", "ArrayReader", "TiffReader",
           "OpenSlideReader", "ImageReader", "SlideReadError", "plan_tiles", "TilePlan", "Tile", "MIN_TILE",
           "DEFAULT_TILE",
           "auto_mask", "otsu_threshold", "SlideMask", "read_thumbnail", "peak_rss_mb"]
