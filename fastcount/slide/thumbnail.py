"""Low-resolution views of a level: the auto mask's input and the heatmap's background.

A thumbnail is read from a coarser pyramid level when the slide has one, so
the counted level is read only for the tiles that are kept. Without one it is
read once in bounded strips, or, when nothing needs it before counting, filled
in from the tiles as the engine reads them (no extra pass over the level).
"""
from __future__ import annotations

import math

import numpy as np

from ..pixels import to_intensities
from .readers import ArrayReader, SlideReader

__all__ = ["THUMB_SIDE", "thumbnail_level", "read_thumbnail", "TileThumbnail", "slide_thumbnail"]

THUMB_SIDE = 1024
# A whole level is read for the thumbnail only below this many pixels.
STRIP_PIXELS = 1 << 24
MIN_THUMB = 256


def thumbnail_level(reader: SlideReader, level: int, max_side: int = THUMB_SIDE) -> int:
    """Level to build ``level``'s thumbnail from. A strictly coarser level is preferred (the
    counted level is then read only for kept tiles): the coarsest with >= max_side pixels,
    else the finest coarser one if it has MIN_THUMB pixels; else ``level`` itself."""
    H, W = reader.level_shapes[level]
    ds0 = reader.downsamples[level]
    coarser = sorted((i for i in range(reader.level_count) if reader.downsamples[i] > ds0 * 1.01),
                     key=lambda i: -max(reader.level_shapes[i]))
    src = level
    if coarser and max(reader.level_shapes[coarser[0]]) >= min(MIN_THUMB, max(H, W)):
        src = coarser[0]
        for i in coarser:
            if max(reader.level_shapes[i]) >= max_side:
                src = i
    return src


def read_thumbnail(reader: SlideReader, level: int = 0, max_side: int = THUMB_SIDE) -> np.ndarray:
    """A low-resolution (h, w, 3) uint8 view of ``level``'s full extent, read from the
    coarsest pyramid level that still has ``max_side`` pixels, in bounded strips."""
    H, W = reader.level_shapes[level]
    if isinstance(reader, ArrayReader) and reader.level_count == 1:
        f = max(1, math.ceil(max(H, W) / max_side))
        a = reader.array[::f, ::f]
        if hasattr(a, "compute"):
            a = a.compute()
        return _as_u8(to_intensities(np.asarray(a), reader.name))
    src = thumbnail_level(reader, level, max_side)
    h, w = reader.level_shapes[src]
    f = max(1, math.ceil(max(h, w) / max_side))
    th, tw = math.ceil(h / f), math.ceil(w / f)
    out = np.zeros((th, tw, 3), dtype=np.float32)
    rows = max(f, (STRIP_PIXELS // max(w, 1)) // f * f)
    for y in range(0, h, rows):
        hh = min(rows, h - y)
        strip = reader.read_region(src, y, 0, hh, w).astype(np.float32)
        # Block means (edge blocks padded by replication so they are not darkened).
        ph, pw = -hh % f, -w % f
        if ph or pw:
            strip = np.pad(strip, ((0, ph), (0, pw), (0, 0)), mode="edge")
        b = strip.reshape(strip.shape[0] // f, f, strip.shape[1] // f, f, 3).mean(axis=(1, 3))
        out[y // f : y // f + b.shape[0]] = b
    return np.round(out).clip(0, 255).astype(np.uint8)


def _as_u8(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.uint8 else np.round(a).clip(0, 255).astype(np.uint8)


class TileThumbnail:
    """A thumbnail of an ``height x width`` level filled from regions as they are read:
    pixel (i, j) is image pixel (i f, j f)."""

    def __init__(self, height: int, width: int, max_side: int = THUMB_SIDE):
        self.factor = max(1, math.ceil(max(height, width) / max_side))
        f = self.factor
        self.image = np.zeros((math.ceil(height / f), math.ceil(width / f), 3), dtype=np.uint8)

    def add(self, y0: int, x0: int, region: np.ndarray):
        """Sample ``region`` (its top-left pixel at row y0, column x0) into the thumbnail."""
        f = self.factor
        oy, ox = (-y0) % f, (-x0) % f
        sub = region[oy::f, ox::f]
        ty, tx = (y0 + oy) // f, (x0 + ox) // f
        self.image[ty : ty + sub.shape[0], tx : tx + sub.shape[1]] = _as_u8(sub)


def slide_thumbnail(reader: SlideReader, level: int, needed_before_counting: bool):
    """``(thumbnail, filler)``: the thumbnail of ``level``, and the ``TileThumbnail`` the tiles
    must fill it through as they are read (None when it was read here)."""
    if needed_before_counting or isinstance(reader, ArrayReader) or thumbnail_level(reader, level) != level:
        return read_thumbnail(reader, level), None
    H, W = reader.level_shapes[level]
    filler = TileThumbnail(H, W)
    return filler.image, filler
