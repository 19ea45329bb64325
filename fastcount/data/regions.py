"""Training data from annotated regions of a slide: ``load_slide_regions``.

A QuPath project exports its point annotations and the regions they were made
in (rectangles or polygons) as one GeoJSON file in level-0 pixel coordinates.
Each region becomes one training image: its bounding box read at the chosen
pyramid level through the slide readers (``fastcount.slide.readers``), only
when the training loop asks for it, and kept afterwards (regions are small;
the slide itself is never loaded whole). Its dot map holds the points inside
the region; points outside every region are ignored. Pixels of the bounding
box outside a non-rectangular region are set to ``fill`` (default 255, white
brightfield background), so the network never sees unannotated cells there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..slide.readers import open_reader
from .datasets import DotDataset
from .points import read_points, read_regions

__all__ = ["SlideRegionDataset", "load_slide_regions", "inside_polygon"]


def inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (x, y) lie inside the polygon of (x, y) vertices."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = np.zeros(x.shape, dtype=bool)
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    for ax, ay, bx, by in zip(px, py, qx, qy):
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < xc)
    return inside


def _box_polygon(box) -> np.ndarray:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"a region box must be (x, y, width, height) in level-0 pixels, got {box!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"a region box needs a positive width and height, got {box!r}")
    return np.array([(x, y), (x + w, y), (x + w, y + h), (x, y + h)])


class SlideRegionDataset(Sequence):
    """Regions of one slide with their dot maps, read lazily at one level (a ``DotDataset`` look-alike)."""

    def __init__(self, reader, level: int, polygons, points, fill: float = 255, name: str = "slide"):
        self.reader, self.level, self.name, self.fill = reader, level, name, fill
        H0, W0 = reader.level_shapes[0]
        H, W = reader.level_shapes[level]
        self._sy, self._sx = H0 / H, W0 / W  # level-0 pixels per level pixel
        self._boxes, self._dots, self._masks, self.names = [], [], [], []
        for i, poly in enumerate(polygons):
            y0 = max(0, math.floor(poly[:, 1].min() / self._sy))
            x0 = max(0, math.floor(poly[:, 0].min() / self._sx))
            y1 = min(H, math.ceil(poly[:, 1].max() / self._sy))
            x1 = min(W, math.ceil(poly[:, 0].max() / self._sx))
            if y1 <= y0 or x1 <= x0:
                raise ValueError(f"region {i} (x {poly[:, 0].min()}..{poly[:, 0].max()}, y {poly[:, 1].min()}.."
                                 f"{poly[:, 1].max()}) lies outside the slide ({W0}x{H0} at level 0)")
            keep = inside_polygon(points[:, 1], points[:, 0], poly) if len(points) else np.zeros(0, bool)
            r = np.floor(points[keep, 0] / self._sy).astype(np.int64) - y0
            c = np.floor(points[keep, 1] / self._sx).astype(np.int64) - x0
            ok = (r >= 0) & (r < y1 - y0) & (c >= 0) & (c < x1 - x0)
            dots = np.zeros((y1 - y0, x1 - x0), dtype=np.int64)
            np.add.at(dots, (r[ok], c[ok]), 1)
            # pixel centres (level-0 coordinates) inside the region; all of them for a rectangle
            yy = (np.arange(y0, y1) + 0.5) * self._sy
            xx = (np.arange(x0, x1) + 0.5) * self._sx
            gx, gy = np.meshgrid(xx, yy)
            mask = inside_polygon(gx, gy, poly)
            self._boxes.append((y0, x0, y1 - y0, x1 - x0))
            self._dots.append(dots)
            self._masks.append(None if mask.all() else mask)
            self.names.append(f"region{i:03d}_x{x0}_y{y0}_L{level}")
        self._images = {}

    def __len__(self):
        return len(self._boxes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        if i not in self._images:
            img = self.reader.read_region(self.level, *self._boxes[i])
            if self._masks[i] is not None:
                img = img.copy()
                img[~self._masks[i]] = self.fill
            self._images[i] = img
        return self._images[i], self._dots[i]

    def subset(self, indices):
        idx = [int(i) for i in indices]
        return DotDataset([self[i][0] for i in idx], [self._dots[i] for i in idx], [self.names[i] for i in idx],
                          self.name)

    @property
    def counts(self) -> np.ndarray:
        return np.array([int(d.sum()) for d in self._dots], dtype=np.int64)

    @property
    def test_size(self) -> int:
        return 0

    def __repr__(self):
        return f"SlideRegionDataset(name={self.name!r}, regions={len(self)}, level={self.level}, dots={int(self.counts.sum())})"


def load_slide_regions(slide, annotations, *, regions=None, level: int = 0, classes=None, region_classes=None,
                       fill: float = 255) -> SlideRegionDataset:
    """A training dataset from annotated regions of a slide.

    Args:
        slide: a path or array any ``count_slide`` reader opens (SVS, NDPI, tiled TIFF, ...).
        annotations: GeoJSON (QuPath export) or CSV of points, in level-0 pixel coordinates.
        regions: boxes ``[(x, y, width, height), ...]`` in level-0 pixels; default: the
            Polygon/MultiPolygon features (QuPath rectangles, polygons) of ``annotations``.
        level: the pyramid level the crops are read at (dots are mapped to it).
        classes: keep only points of these class names.
        region_classes: keep only regions of these class names (GeoJSON regions).
        fill: value for pixels of a region's bounding box outside a polygonal region.
    """
    reader = open_reader(slide, name="slide")
    if not isinstance(level, int) or not 0 <= level < reader.level_count:
        raise ValueError(f"level must be an int in [0, {reader.level_count}), got {level!r}")
    points = read_points(annotations, classes)
    if regions is None:
        if Path(annotations).suffix.lower() == ".csv":
            raise ValueError("regions=[(x, y, width, height), ...] is needed with CSV point annotations")
        polygons = read_regions(annotations, region_classes)
        if not polygons:
            raise ValueError(f"{annotations} holds no region (Polygon/MultiPolygon feature"
                             f"{' of classes ' + str(region_classes) if region_classes else ''}); "
                             "draw the annotated regions in QuPath or pass regions=[(x, y, width, height), ...]")
    else:
        polygons = [_box_polygon(b) for b in regions]
        if not polygons:
            raise ValueError("regions is empty; pass at least one (x, y, width, height) box")
    name = Path(slide).stem if not hasattr(slide, "shape") else "slide"
    return SlideRegionDataset(reader, level, polygons, points, fill=fill, name=name)
