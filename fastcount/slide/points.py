"""Points of a slide: a tile consumer that feeds ``fastcount.locate``'s blocks.

Each locate block needs the count map over its window (the block, ``halo``
past it and the ``r/s - 1`` count-map rows that see the halo). The consumer
copies every computed tile's crop into the windows it meets; a window is
complete when every kept tile it meets has arrived, and is then deconvolved
and freed. Tiles the mask skipped count 0 everywhere, so their part of a
window stays zero, exactly as in the whole-image count map with those tiles
zeroed. Blocks whose window meets no kept tile have no points.

Points belong to the block whose cells hold their maximum (see
``fastcount.locate``), so they do not depend on the tile plan, the batches or
their order. Memory: the windows in flight, about two rows of blocks across
the slide in raster order (``width x (block + 2 halo + r) x 4`` bytes each).
"""
from __future__ import annotations

import time

import torch

from ..geometry import Geometry
from ..localise import BlockCandidates, Locator, Points
from .plan import Tile

__all__ = ["SlidePoints"]

_READY_BATCH = 16  # complete windows deconvolved together


class SlidePoints:
    """Collects a job's points; pass it to ``run_batches(..., consumers=[...])``, then ``finish(total)``."""

    def __init__(self, shape: tuple[int, int], geometry: Geometry, kept: list[Tile], **locate_options):
        self.locator = Locator(*shape, geometry, **locate_options)
        self._expected = [0] * self.locator.n_blocks
        for t in kept:
            for b in self._blocks_of(t):
                self._expected[b] += 1
        self._windows: dict[int, torch.Tensor] = {}
        self._arrived = [0] * self.locator.n_blocks
        self._ready: list[int] = []
        self.candidates: list[BlockCandidates] = []
        self.seconds = 0.0  # spent here (inside the engine's compute time)

    def _blocks_of(self, t: Tile) -> list[int]:
        y0, x0 = t.gy0, t.gx0
        return self.locator.windows_of(y0, y0 + t.cy1 - t.cy0, x0, x0 + t.cx1 - t.cx0)

    def __call__(self, t: Tile, piece: torch.Tensor):
        t0 = time.perf_counter()
        self._add(t, piece)
        self.seconds += time.perf_counter() - t0

    def _add(self, t: Tile, piece: torch.Tensor):
        loc = self.locator
        side = loc.map_side
        h, w = piece.shape
        for b in self._blocks_of(t):
            win = self._windows.get(b)
            if win is None:
                # float32 holds the backends' count maps exactly, at half the memory
                win = self._windows[b] = torch.zeros((side, side), dtype=torch.float32, device=piece.device)
            wy, wx = loc.window(b)
            ya, yb = max(t.gy0, wy), min(t.gy0 + h, wy + side)
            xa, xb = max(t.gx0, wx), min(t.gx0 + w, wx + side)
            win[ya - wy : yb - wy, xa - wx : xb - wx] = piece[ya - t.gy0 : yb - t.gy0, xa - t.gx0 : xb - t.gx0]
            self._arrived[b] += 1
            if self._arrived[b] == self._expected[b]:
                self._ready.append(b)
        if len(self._ready) >= _READY_BATCH:
            self._solve_ready()

    def _solve_ready(self):
        if not self._ready:
            return
        idx = sorted(self._ready)
        wins = torch.stack([self._windows.pop(b) for b in idx])
        self._ready = []
        self.candidates.extend(self.locator.solve(idx, wins))

    def finish(self, total: float) -> Points:
        """The points, ``round(total)`` of them; every kept tile must have been consumed."""
        t0 = time.perf_counter()
        self._solve_ready()
        self.seconds += time.perf_counter() - t0
        if self._windows:
            raise RuntimeError(f"{len(self._windows)} locate windows are incomplete: not every kept tile was counted")
        return self.locator.finish(self.candidates, total)
