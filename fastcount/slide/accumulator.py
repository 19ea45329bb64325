"""Where computed tiles are summed: per-tile float64 sums, the density grid, the finished batches.

``reduce_tile`` turns one tile's count-map crop into a ``TileSum``; the
``Accumulator`` adds a batch of them. A batch is applied whole or not at all
as far as the saved state goes: ``add`` stages it first, and ``commit`` (called
again from the engine's ``finally``) finishes a batch a Ctrl-C cut short, so a
checkpoint never holds half a batch and no tile is counted twice on resume.

The total does not depend on the order batches were added, nor on which
process added them: it is the ``math.fsum`` of the per-tile sums in tile
order. Accumulators that counted disjoint batches of one job ``merge``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .plan import Tile

__all__ = ["TileSum", "reduce_tile", "block_sums", "Accumulator"]


class TileSum(NamedTuple):
    tile: Tile
    total: float  # float64 sum of the tile's count-map crop
    block_row: int  # first density block the crop touches
    block_col: int
    blocks: torch.Tensor  # float64 block sums of the crop (on the compute device)


def block_sums(piece: torch.Tensor, gy0: int, gx0: int, cell: int):
    """Sum ``piece`` (placed at global count-map row gy0, col gx0) into density blocks:
    returns (first block row, first block col, block sums)."""
    h, w = piece.shape
    dev = piece.device
    ry = (torch.arange(gy0, gy0 + h, device=dev) // cell) - gy0 // cell
    rx = (torch.arange(gx0, gx0 + w, device=dev) // cell) - gx0 // cell
    rows = torch.zeros((int(ry[-1]) + 1, w), dtype=piece.dtype, device=dev).index_add_(0, ry, piece)
    blk = torch.zeros((rows.shape[0], int(rx[-1]) + 1), dtype=piece.dtype, device=dev).index_add_(1, rx, rows)
    return gy0 // cell, gx0 // cell, blk


def reduce_tile(tile: Tile, piece: torch.Tensor, cell: int) -> TileSum:
    """The sums of one tile's float64 count-map crop ``piece``."""
    by, bx, blk = block_sums(piece, tile.gy0, tile.gx0, cell)
    return TileSum(tile, float(piece.sum()), by, bx, blk)


@dataclass
class _Staged:
    batch: int
    results: list[TileSum]
    applied: int = 0


class Accumulator:
    """Sums of the batches of one job: ``sums`` per tile (NaN until counted), ``density``
    (float64, host), ``done`` per batch. Density is summed on ``device`` and moved to the
    host by ``flush``."""

    def __init__(self, n_tiles: int, n_batches: int, density_shape, device: torch.device):
        self.sums = np.full(n_tiles, np.nan)
        self.done = np.zeros(n_batches, dtype=bool)
        self.density = np.zeros(density_shape, dtype=np.float64)
        self._density_dev = torch.zeros(density_shape, dtype=torch.float64, device=device)
        self._unflushed = False
        self._staged: _Staged | None = None
        self.tiles_added = 0  # by this accumulator (not restored ones)
        self.area_added = 0  # full-resolution count-map pixels of those tiles

    # ---------------------------------------------------------------- adding

    def add(self, batch: int, results: list[TileSum]):
        """Add the tiles of batch ``batch``: staged first, so ``commit`` can finish it if interrupted."""
        self._staged = _Staged(batch, results)
        self.commit()

    def commit(self):
        """Finish applying the staged batch, if any (safe to call at any time, any number of times)."""
        st = self._staged
        if st is None:
            return
        for k in range(st.applied, len(st.results)):
            r = st.results[k]
            self.sums[r.tile.index] = r.total
            self._density_dev[r.block_row : r.block_row + r.blocks.shape[0],
                              r.block_col : r.block_col + r.blocks.shape[1]] += r.blocks
            self._unflushed = True
            self.area_added += (r.tile.oy1 - r.tile.oy0) * (r.tile.ox1 - r.tile.ox0)
            st.applied = k + 1
        self.done[st.batch] = True
        self.tiles_added += len(st.results)
        self._staged = None

    def flush(self):
        """Move the density summed on the device into ``density``."""
        if self._unflushed:
            self.density[...] += self._density_dev.cpu().numpy()
            self._density_dev.zero_()
            self._unflushed = False

    # ---------------------------------------------------------------- state

    def restore(self, done: np.ndarray, sums: np.ndarray, density: np.ndarray):
        """Continue from a saved state (of the same job)."""
        self.done, self.sums, self.density = done, sums, density

    def state(self):
        """``(done, sums, density)`` with every committed batch in it (flushes first)."""
        self.flush()
        return self.done, self.sums, self.density

    def pending(self) -> list[int]:
        """Indices of the batches not finished yet, in order."""
        return [int(i) for i in np.flatnonzero(~self.done)]

    def merge(self, other: "Accumulator"):
        """Take in ``other``'s finished batches (of the same job, disjoint from this one's)."""
        if other.done.shape != self.done.shape or other.sums.shape != self.sums.shape:
            raise ValueError("can only merge accumulators of the same job")
        if (self.done & other.done).any():
            raise ValueError("the accumulators share finished batches: they would be counted twice")
        counted = ~np.isnan(other.sums)
        self.sums[counted] = other.sums[counted]
        self.density += other.state()[2]
        self.done |= other.done
        self.tiles_added += other.tiles_added
        self.area_added += other.area_added

    def total(self, tiles: list[Tile], redundancy: float) -> float:
        """The count over ``tiles``: ``math.fsum`` of their sums in tile order / the redundancy."""
        return math.fsum(float(self.sums[t.index]) for t in tiles) / redundancy
