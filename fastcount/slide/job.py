"""What one ``count_slide`` call will compute: the level, the tile plan, the mask, the batches.

Tiles whose whole input box is masked out are dropped here and never read.
The kept tiles are batched by equal input shape (a backend call takes one
shape), and the batches are ordered by their first tile, so the work runs in
raster order whatever the grouping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import Geometry
from .mask import SlideMask, auto_mask, prepare_mask
from .plan import Tile, TilePlan, plan_tiles
from .readers import SlideReader
from .thumbnail import TileThumbnail, slide_thumbnail

__all__ = ["SlideJob", "plan_job", "pick_level", "default_cell"]

# Density grids stay at most this many blocks a side (the default cell doubles until they do).
MAX_DENSITY_SIDE = 2048
# Tiles per GPU batch: about this many output pixels a side in total.
GPU_BATCH_SIDE = 2048


@dataclass(frozen=True)
class SlideJob:
    level: int
    shape: tuple[int, int]  # (H, W) of the counted level
    plan: TilePlan
    kept: list[Tile]  # the tiles to count (the others are background: they count 0)
    batches: list[list[Tile]]
    batch_size: int
    cell: int  # density block side in count-map pixels
    thumbnail: np.ndarray
    thumbnail_filler: TileThumbnail | None  # fills ``thumbnail`` from the tiles as they are read
    mask_info: dict

    @property
    def density_shape(self) -> tuple[int, int]:
        oh, ow = self.plan.out_shape
        return math.ceil(oh / self.cell), math.ceil(ow / self.cell)


def pick_level(reader: SlideReader, level, mpp) -> int:
    """The pyramid level to count at: ``level``, or the one whose microns per pixel is closest to ``mpp``."""
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not mpp > 0:
            raise ValueError(f"mpp must be a positive number (target microns per pixel), got {mpp!r}")
        if reader.mpp is None:
            raise ValueError(f"mpp={mpp} was requested but {reader.name} does not record its microns per pixel; "
                             f"pass level= instead (levels: {reader.level_shapes})")
        mpps = [reader.mpp * d for d in reader.downsamples]
        return int(np.argmin([abs(math.log(m / mpp)) for m in mpps]))
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise TypeError(f"level must be an int pyramid level (or use mpp=...), got {type(level).__name__}")
    if not 0 <= level < reader.level_count:
        raise ValueError(f"level must be in 0..{reader.level_count - 1} for {reader.name} "
                         f"(levels {reader.level_shapes}), got {level}")
    return int(level)


def default_cell(g: Geometry, out_shape) -> int:
    """Density block side (count-map px): r/s (one window), coarser for huge slides so
    the grid stays <= MAX_DENSITY_SIDE per side."""
    cell = max(1, g.r // g.stride)
    while max(out_shape) / cell > MAX_DENSITY_SIDE:
        cell *= 2
    return cell


def _check_cell(cell) -> int:
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f"cell must be a positive int (density block side in count-map pixels), got {cell!r}")
    return cell


def _slide_mask(mask, thumb: np.ndarray, H: int, W: int, g: Geometry):
    """``(SlideMask or None, mask_info)`` for the ``mask`` argument (None, "auto" or an array)."""
    if mask is None:
        return None, {"kind": "none"}
    if isinstance(mask, str):
        f = max(H / thumb.shape[0], W / thumb.shape[1])
        m, info = auto_mask(thumb, dilate=2 + math.ceil(g.r / f))
        smask = SlideMask(m, H, W)
    else:
        smask, info = SlideMask(prepare_mask(mask, H, W), H, W), {"kind": "user"}
    info["fraction"] = smask.fraction
    return smask, info


def _batches(kept: list[Tile], batch_size: int) -> list[list[Tile]]:
    groups: dict[tuple, list[Tile]] = {}
    for t in kept:
        groups.setdefault(t.in_shape, []).append(t)
    batches = [grp[i : i + batch_size] for grp in groups.values() for i in range(0, len(grp), batch_size)]
    batches.sort(key=lambda b: b[0].index)
    return batches


def plan_job(reader: SlideReader, g: Geometry, *, level, mpp, tile: int, cell, mask, batch_size,
             device: torch.device) -> SlideJob:
    lvl = pick_level(reader, level, mpp)
    H, W = reader.level_shapes[lvl]
    plan = plan_tiles(H, W, tile, g)
    cell = default_cell(g, plan.out_shape) if cell is None else _check_cell(cell)
    # The thumbnail comes first: the auto mask is computed on it, and it is the heatmap's background.
    thumb, filler = slide_thumbnail(reader, lvl, needed_before_counting=isinstance(mask, str))
    smask, mask_info = _slide_mask(mask, thumb, H, W, g)
    kept = [t for t in plan.tiles if smask is None or smask.any(t.iy0, t.iy1, t.ix0, t.ix1)]
    if batch_size is None:
        batch_size = 1 if device.type == "cpu" else max(1, (GPU_BATCH_SIDE // tile) ** 2)
    return SlideJob(level=lvl, shape=(H, W), plan=plan, kept=kept, batches=_batches(kept, batch_size),
                    batch_size=batch_size, cell=cell, thumbnail=thumb, thumbnail_filler=filler,
                    mask_info=mask_info)
