"""Points of a slide: a tile consumer that feeds ``fastcount.locate``'s blocks.

Each locate block needs the count map over its window (the block, ``halo``
past it and the ``r/s - 1`` count-map rows that see the halo). The consumer
copies every computed tile's crop into the windows it meets; a window is
complete when every kept tile it meets has arrived, and is then deconvolved
and freed. Tiles the mask skipped count 0 everywhere, so their part of a
window stays zero, exactly as in the whole-image count map with those tiles
zeroed. Blocks whose window meets no kept tile have no points.

With a guided model (``LocateParams.guide``) each tile also hands over its input
pixels; the guide cells they determine exactly (``guide_cells``: the tile's
input less the guide's reach on interior sides, which the tile halo covers)
go into the guide boxes of the blocks they meet. Guide cells no kept tile
determines (under skipped tiles) stay 0, so nothing is placed there.

Points belong to the block whose cells hold their maximum (see
``fastcount.locate``), so they do not depend on the tile plan, the batches or
their order. Memory: the windows in flight, about two rows of blocks across
the slide in raster order (``width x (block + 2 halo + r) x 4`` bytes each).
"""
from __future__ import annotations

import time

import torch

from ..geometry import Geometry
from ..localise import BlockCandidates, LocateParams, Locator, Points, guide_cells, guide_span
from .plan import Tile

__all__ = ["SlidePoints"]

_READY_BATCH = 16  # complete windows deconvolved together


class SlidePoints:
    """Collects a job's points; pass it to ``run_batches(..., consumers=[...])``, then ``finish(total)``."""

    def __init__(self, shape: tuple[int, int], geometry: Geometry, kept: list[Tile],
                 params: LocateParams | None = None, **locate_options):
        self.shape = tuple(shape)
        self.locator = Locator(*shape, geometry, params=params, **locate_options)
        self._expected = [0] * self.locator.n_blocks
        for t in kept:
            for b in self._blocks_of(t):
                self._expected[b] += 1
        self._windows: dict[int, torch.Tensor] = {}
        self._guides: dict[int, torch.Tensor] = {}
        self._arrived = [0] * self.locator.n_blocks
        self._ready: list[int] = []
        self.candidates: list[BlockCandidates] = []
        self.seconds = 0.0  # spent here (inside the engine's compute time)

    def _guide_cells_of(self, t: Tile) -> tuple[int, int, int, int]:
        """Guide cells [y0, y1) x [x0, x1) that tile ``t``'s input determines."""
        m, s = self.locator.params.reach(), self.locator.g.stride
        _, _, y0, y1 = guide_span(t.iy0, t.iy1, self.shape[0], m, s)
        _, _, x0, x1 = guide_span(t.ix0, t.ix1, self.shape[1], m, s)
        return y0, y1, x0, x1

    def _blocks_of(self, t: Tile) -> list[int]:
        y0, x0 = t.gy0, t.gx0
        blocks = self.locator.windows_of(y0, y0 + t.cy1 - t.cy0, x0, x0 + t.cx1 - t.cx0)
        if self.locator.guided:
            blocks = sorted(set(blocks) | set(self.locator.guide_blocks_of(*self._guide_cells_of(t))))
        return blocks

    def __call__(self, t: Tile, piece: torch.Tensor, pixels: torch.Tensor | None = None):
        """Tile ``t``'s crop of the count map and, for a guided model, its input ``pixels`` (C, h, w)."""
        t0 = time.perf_counter()
        self._add(t, piece, pixels)
        self.seconds += time.perf_counter() - t0

    def _add(self, t: Tile, piece: torch.Tensor, pixels: torch.Tensor | None):
        loc = self.locator
        side = loc.map_side
        h, w = piece.shape
        guide = None
        if loc.guided:
            if pixels is None or tuple(pixels.shape[-2:]) != (t.iy1 - t.iy0, t.ix1 - t.ix0):
                raise ValueError(f"tile {t.index}: a guided locate needs the tile's input pixels "
                                 f"({t.iy1 - t.iy0}x{t.ix1 - t.ix0}), got "
                                 f"{None if pixels is None else tuple(pixels.shape)}")
            guide = guide_cells(pixels, loc.params, loc.g.stride, (t.iy0, t.ix0), self.shape)
        for b in self._blocks_of(t):
            win = self._windows.get(b)
            if win is None:
                # float32 holds the backends' count maps exactly, at half the memory
                win = self._windows[b] = torch.zeros((side, side), dtype=torch.float32, device=piece.device)
            wy, wx = loc.window(b)
            ya, yb = max(t.gy0, wy), min(t.gy0 + h, wy + side)
            xa, xb = max(t.gx0, wx), min(t.gx0 + w, wx + side)
            if ya < yb and xa < xb:
                win[ya - wy : yb - wy, xa - wx : xb - wx] = piece[ya - t.gy0 : yb - t.gy0, xa - t.gx0 : xb - t.gx0]
            if guide is not None:
                self._add_guide(b, *guide)
            self._arrived[b] += 1
            if self._arrived[b] == self._expected[b]:
                self._ready.append(b)

    def _add_guide(self, b: int, gy: int, gx: int, cells: torch.Tensor):
        n = self.locator.block + 2
        box = self._guides.get(b)
        if box is None:
            box = self._guides[b] = torch.zeros((n, n), dtype=torch.float64, device=cells.device)
        by, bx = self.locator.guide_box(b)
        ya, yb = max(gy, by), min(gy + cells.shape[0], by + n)
        xa, xb = max(gx, bx), min(gx + cells.shape[1], bx + n)
        if ya < yb and xa < xb:  # overlapping tiles determine the same cells bit for bit
            box[ya - by : yb - by, xa - bx : xb - bx] = cells[ya - gy : yb - gy, xa - gx : xb - gx]
        if len(self._ready) >= _READY_BATCH:
            self._solve_ready()

    def _solve_ready(self):
        if not self._ready:
            return
        idx = sorted(self._ready)
        wins = torch.stack([self._windows.pop(b) for b in idx])
        guides = None
        if self.locator.guided:
            n = self.locator.block + 2
            guides = torch.stack([self._guides.pop(b, None) if b in self._guides else
                                  torch.zeros((n, n), dtype=torch.float64, device=wins.device) for b in idx])
        self._ready = []
        self.candidates.extend(self.locator.solve(idx, wins, guides))

    def finish(self, total: float) -> Points:
        """The points, ``round(total)`` of them; every kept tile must have been consumed."""
        t0 = time.perf_counter()
        self._solve_ready()
        self.seconds += time.perf_counter() - t0
        if self._windows:
            raise RuntimeError(f"{len(self._windows)} locate windows are incomplete: not every kept tile was counted")
        return self.locator.finish(self.candidates, total)
