"""One batch of tiles through the backend: each tile's float64 crop of the whole-image count map.

A backend that offers ``unpadded(x)`` (the cpu backend: the first conv without its r-pixel
zero padding) gets each tile's input padded with r zeros on the true image border only;
elsewhere the tile's halo holds real pixels, so the map it computes is the rows the tile
keeps plus the 6-row margin of the padded 3x3 convs on each side, instead of the r + 6
halo rows and the r zero rows on both sides. The result is the same count map (the
zero padding of the whole image is reproduced exactly where the whole image has it),
for less work per tile (see benchmarks/RESULTS.md). Other backends run the
padded input as ``fn(x)`` and are cropped by the tile plan.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import Geometry
from .plan import Tile

__all__ = ["tile_maps"]


def _border_pads(t: Tile, height: int, width: int, r: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a tile's input: r on the true image border, else 0."""
    return (r if t.ix0 == 0 else 0, r if t.ix1 == width else 0, r if t.iy0 == 0 else 0, r if t.iy1 == height else 0)


def tile_maps(fn, x: torch.Tensor, tiles: list[Tile], shape: tuple[int, int], g: Geometry) -> list[torch.Tensor]:
    """``x`` (N, C, h, w): the inputs of ``tiles`` (as the plan reads them); returns each tile's crop, float64."""
    unpadded = getattr(fn, "unpadded", None)
    if unpadded is None:
        out = fn(x)
        return [out[k, 0, t.cy0 : t.cy1, t.cx0 : t.cx1].to(torch.float64) for k, t in enumerate(tiles)]
    r, s = g.patch_size, g.stride
    groups: dict[tuple, list[int]] = {}
    for k, t in enumerate(tiles):  # tiles of one batch share an input shape, not always a border
        groups.setdefault(_border_pads(t, *shape, r), []).append(k)
    pieces: list[torch.Tensor | None] = [None] * len(tiles)
    for pads, ks in groups.items():
        out = unpadded(F.pad(x if len(ks) == len(tiles) else x[ks], pads))
        for i, k in enumerate(ks):
            t = tiles[k]
            # the unpadded map starts r rows later where the first conv has no padding (its row 0
            # is full-resolution row a + r); r is a multiple of the stride
            dy, dx = (0 if pads[2] else r // s), (0 if pads[0] else r // s)
            pieces[k] = out[i, 0, t.cy0 - dy : t.cy1 - dy, t.cx0 - dx : t.cx1 - dx].to(torch.float64)
    return pieces
