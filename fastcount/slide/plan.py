"""Tile plan: output tiles that partition the count map exactly.

The full-resolution (stride-1) count map of an ``H x W`` image is
``(H + r) x (W + r)``. It is cut into output tiles of at most ``tile x tile``
full-resolution pixels, evened out along each axis (a multiple of the stride;
edge tiles may be smaller). Each tile reads the input rows
``Geometry.input_span`` gives (full halo on interior sides, clipped at the
true image border so the whole image's own feature-map padding is
reproduced), with the first row/column moved down to a multiple of the stride
so the strided count map of the tile samples the same global rows as the
whole-image map. Running the network on that input and cropping yields
exactly the tile's part of the whole-image count map; every count-map pixel
belongs to exactly one tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..geometry import Geometry

__all__ = ["Tile", "TilePlan", "plan_tiles", "MIN_TILE", "DEFAULT_TILE", "DEFAULT_CPU_TILE", "default_tile",
           "check_tile"]

# Smaller tiles would spend almost all their work on the 2 x (r + 6) halo.
MIN_TILE = 16
# The output tile side ``count_slide`` and ``fastcount count`` use unless told otherwise: on a GPU
# (large batches of large tiles keep it busy), and on the CPU, where a smaller tile is as fast
# (the cpu backend computes a tile's halo only once, slide/compute.py) at less memory
# (measured: benchmarks/RESULTS.md, "count_slide against the raw backend").
DEFAULT_TILE = 1024
DEFAULT_CPU_TILE = 512


def default_tile(device) -> int:
    """The default output tile side for a ``torch.device``: ``DEFAULT_CPU_TILE`` on the CPU, else ``DEFAULT_TILE``."""
    return DEFAULT_CPU_TILE if device.type == "cpu" else DEFAULT_TILE


@dataclass(frozen=True)
class Tile:
    index: int
    # input box (rows [iy0, iy1), cols [ix0, ix1)) at the chosen level
    iy0: int
    iy1: int
    ix0: int
    ix1: int
    # crop of the tile's strided count map, and where it lands in the global count map
    cy0: int
    cy1: int
    cx0: int
    cx1: int
    gy0: int
    gx0: int
    # full-resolution output box (for the image-pixel area it accounts for)
    oy0: int
    oy1: int
    ox0: int
    ox1: int

    @property
    def in_shape(self) -> tuple[int, int]:
        return self.iy1 - self.iy0, self.ix1 - self.ix0


def check_tile(tile, stride: int) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise TypeError(f"tile must be an int (output tile side in full-resolution pixels), got {type(tile).__name__}")
    if tile < MIN_TILE:
        raise ValueError(f"tile must be >= {MIN_TILE} (output tile side in full-resolution pixels), got {tile}")
    if tile % stride:
        raise ValueError(f"tile must be a multiple of the model's output stride {stride}, got {tile}")
    return tile


@dataclass
class TilePlan:
    height: int
    width: int
    tile: int
    geometry: Geometry
    tiles: list[Tile]
    grid: tuple[int, int]

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.geometry.output_size(self.height, self.width)


def _spans(n: int, tile: int, g: Geometry):
    """Per tile along one axis: (input a, b), (crop c0, c1), global count-map start, full-res out span."""
    full = g.full_size(n)
    s = g.stride
    # Even out the tiles (never above ``tile``): a thin last tile would pay a whole halo.
    k = math.ceil(full / tile)
    step = min(tile, math.ceil(math.ceil(full / k) / s) * s)
    out = []
    for o0 in range(0, full, step):
        o1 = min(o0 + step, full)
        a, b = g.input_span(o0, o1, n)
        a -= a % s  # extra halo above: harmless, and aligns the tile's stride grid with the global one
        c0 = (o0 - a) // s
        c1 = math.ceil((o1 - a) / s)
        out.append(((a, b), (c0, c1), o0 // s, (o0, o1)))
    return out


def plan_tiles(height: int, width: int, tile: int, geometry: Geometry) -> TilePlan:
    """All output tiles of an ``height x width`` image, in raster order."""
    for nm, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"image {nm} must be a positive int, got {v!r}")
    check_tile(tile, geometry.stride)
    rows, cols = _spans(height, tile, geometry), _spans(width, tile, geometry)
    tiles = []
    for (ya, yc, gy, yo) in rows:
        for (xa, xc, gx, xo) in cols:
            tiles.append(Tile(len(tiles), ya[0], ya[1], xa[0], xa[1], yc[0], yc[1], xc[0], xc[1], gy, gx,
                              yo[0], yo[1], xo[0], xo[1]))
    return TilePlan(height, width, tile, geometry, tiles, (len(rows), len(cols)))
