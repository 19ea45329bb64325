"""Points from the redundant count map: ``locate``.

A count map is a noisy box sum of the dot map, ``F = B_r * L`` (the operator
of ``make_targets``). ``locate`` undoes the box by a regularised inverse
filter (Wiener; optionally more projected steps towards ``L >= 0``) computed
with FFTs, takes the local maxima of the result as candidate objects, and
places as many points in each block of the image as the count says are there.

Local by construction, so tiles give exactly the whole-image answer: the
image is cut into fixed ``block x block`` squares anchored at the origin. Each
block is deconvolved from the count map over a window that reaches ``halo``
pixels (default 2r) past the block on every side (plus the ``r - 1`` count-map rows that
see those pixels), zeros outside the count map, and only the maxima whose
pixel lies inside the block are kept. Every point therefore belongs to
exactly one block (no duplicates or gaps at seams), and a block only needs
the count map over its window, which is what the slide engine hands it
(``fastcount.slide.points``).

Count consistency: block ``b``'s count ``c_b`` is the count map summed over
the pixels whose window is centred on the block (a partition of the map, so
the ``c_b`` add up to the count ``sum(F) / (r/s)^2``). Negative block counts
(an untrained or poorly fitting model) become 0, the rest are scaled to add
up to ``round(count)`` and rounded by largest remainder: the image gets
exactly ``round(count)`` points, every block the floor or ceil of its scaled
count. A block with more objects than maxima repeats its best maxima; one
with no candidate at all (nothing positive deconvolved in it) counts 0.

Image guide (``LocateParams.guide``, chosen per model): for a model whose count
map alone places objects poorly (large, crowded cells: the MBM model), the
candidates are the maxima of the deconvolved map (smoothed) times the image's
positive Laplacian-of-Gaussian response at the cells' scale, so the count map
says where and how many, the image says exactly where. The response at a pixel
depends only on the image within ``ceil(4 sigma)`` pixels of it (edge-replicated
past the image border), summed in a fixed order, so a tile computes it bit for
bit as the whole image does; the slide engine's tile halo covers that reach.

Coordinates: (row, col) in input pixels, pixel ``p``'s centre at ``p``
(dot annotations' convention). With output stride ``s`` the count map is a
box of side ``r/s`` over ``s x s`` cells; points land on cell centres plus
the sub-cell centroid.

Rounding: tiled and whole-image count maps differ by float rounding (~1e-7
relative). Everything runs in float64, maxima are taken with ``>=`` (ties of
exactly equal values keep both), candidates are ordered by score then
position, and block masses by value then block index, so only values within
that rounding of a decision boundary can decide differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .geometry import PADDED_CONVS, Geometry
from .pixels import image_to_tensor

__all__ = ["locate", "Points", "Locator", "LocateParams", "BlockCandidates", "DEFAULT_BLOCK", "DEFAULT_ITERATIONS",
           "guide_cells"]

DEFAULT_BLOCK = 512  # input pixels (at most the image's side); the unit of count consistency and of work
# Count-map context past each block, in units of r: the inverse filter reaches far, and a short
# halo costs F1 near seams (docs/accuracy.md).
DEFAULT_HALO_WINDOWS = 2
DEFAULT_ITERATIONS = 1  # more steps fit the model's noise: F1 falls (docs/accuracy.md)
# Candidates kept per block beyond its expected count (the count is only known at the end).
_SPARE = 8
# A local maximum below this deconvolved value is noise, not an object.
_MIN_PEAK = 1e-4
_CHUNK = 16  # windows deconvolved at once
_NMS = 1  # a maximum is the largest value within this many cells

# The weights-metadata key that holds a model's LocateParams (JSON).
METADATA_KEY = "locate"
_GUIDES = (None, "dark", "bright")


@dataclass(frozen=True)
class LocateParams:
    """How ``locate`` turns a model's count map into points; chosen per model on its validation
    images (``benchmarks/locate_report.py --tune``) and stored in its weights (metadata ``"locate"``).

    eps: Wiener regularisation relative to the box's squared weight (1e-4: best F1 on the default
        weights' validation images, among 3e-5 .. 1e-3).
    smooth: Gaussian sigma, in cells, applied to the deconvolved map before its maxima are taken
        (0: none).
    guide: None, or ``"dark"`` / ``"bright"``: objects darker / brighter than their surroundings in
        the image; the maxima are then taken of the smoothed map times the image's LoG response.
    guide_sigma: the LoG's scale in input pixels (about a cell's radius / sqrt 2).
    """

    eps: float = 1e-4
    smooth: float = 0.0
    guide: str | None = None
    guide_sigma: float = 2.0

    def __post_init__(self):
        for name in ("eps", "smooth", "guide_sigma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 \
                    or (v == 0 and name != "smooth"):
                raise ValueError(f"LocateParams.{name} must be a {'non-negative' if name == 'smooth' else 'positive'} "
                                 f"number, got {v!r}")
        if self.guide not in _GUIDES:
            raise ValueError(f"LocateParams.guide must be None, 'dark' or 'bright', got {self.guide!r}")

    @classmethod
    def of(cls, model) -> "LocateParams":
        """The parameters stored in ``model``'s weights (``load_model``), else the defaults."""
        raw = (getattr(model, "metadata", None) or {}).get(METADATA_KEY)
        if raw is None:
            return cls()
        try:
            return cls(**json.loads(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"the model's {METADATA_KEY!r} metadata is not valid LocateParams: {raw!r} ({e})") from None

    def to_json(self) -> str:
        return json.dumps({"eps": self.eps, "smooth": self.smooth, "guide": self.guide, "guide_sigma": self.guide_sigma})

    def reach(self) -> int:
        """Input pixels of image a guide value depends on, each side (0 without a guide)."""
        return int(np.ceil(4 * self.guide_sigma)) if self.guide else 0


class Points(NamedTuple):
    """``coords``: float64 (N, 2) as (row, col) in input pixels; ``scores``: float64 (N,), the
    deconvolved mass within one cell of the point (higher = clearer; the inverse filter spreads
    an object, so a clean isolated one scores about 0.2 at stride 1)."""

    coords: np.ndarray
    scores: np.ndarray

    def __len__(self):  # the number of points, not of fields
        return len(self.scores)


@dataclass
class BlockCandidates:
    """One block's deconvolved mass and its candidate points, best first."""

    index: int  # raster index of the block
    mass: float
    coords: np.ndarray  # (k, 2) input-pixel (row, col)
    scores: np.ndarray  # (k,)


class Locator:
    """The block plan and the deconvolution for an ``height x width`` image.

    Count-map coordinates are those of the (strided) count map; ``cells`` are
    its ``s x s`` input cells (the dot map the box acts on), ``k = r/s`` its box side.
    """

    def __init__(self, height: int, width: int, geometry: Geometry, *, block: int = DEFAULT_BLOCK,
                 halo: int | None = None, iterations: int = DEFAULT_ITERATIONS, params: LocateParams | None = None):
        params = LocateParams() if params is None else params
        if not isinstance(params, LocateParams):
            raise TypeError(f"params must be a LocateParams or None, got {type(params).__name__}")
        if params.guide and 2 * params.reach() + geometry.stride > geometry.r + 2 * PADDED_CONVS:
            raise ValueError(f"LocateParams.guide_sigma={params.guide_sigma} reaches further than a tile's halo "
                             f"allows for patch_size={geometry.r}, stride={geometry.stride}")
        self.params = params
        for name, v in (("block", block), ("iterations", iterations)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        halo = DEFAULT_HALO_WINDOWS * geometry.r if halo is None else halo
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"halo must be a non-negative int (input pixels), got {halo!r}")
        s = geometry.stride
        if block % s or halo % s:
            raise ValueError(f"block and halo must be multiples of the stride {s}, got block={block}, halo={halo}")
        self.g, self.height, self.width = geometry, height, width
        self.k = geometry.r // s
        self.map_shape = geometry.output_size(height, width)
        self.cells = (self.map_shape[0] - self.k, self.map_shape[1] - self.k)
        # in cells; a block never exceeds the image (smaller FFTs for small images, same for every tiling)
        self.block, self.halo, self.iterations = min(block // s, max(self.cells)), halo // s, iterations
        self.grid = (-(-self.cells[0] // self.block), -(-self.cells[1] // self.block))
        self.side = self.block + 2 * self.halo  # cells of a window
        self.map_side = self.side + self.k - 1  # count-map pixels of a window

    @property
    def n_blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    def window(self, index: int) -> tuple[int, int]:
        """Count-map (row, col) of the first pixel of block ``index``'s window (may be negative).

        Its cells start ``halo`` before the block; count-map row ``Y`` sees cells
        ``Y - k .. Y - 1``, so the window's rows are the cells' first + 1 onwards."""
        bi, bj = divmod(index, self.grid[1])
        return bi * self.block - self.halo + 1, bj * self.block - self.halo + 1

    def windows_of(self, y0: int, y1: int, x0: int, x1: int) -> list[int]:
        """Blocks whose window meets count-map rows [y0, y1) x cols [x0, x1)."""
        def span(a, b, n):  # window rows [i*block - halo + 1, + map_side) meet [a, b)
            lo = max(0, (a + self.halo - 1 - self.map_side) // self.block + 1)
            hi = min(n - 1, (b + self.halo - 2) // self.block)
            return range(lo, hi + 1)
        return [i * self.grid[1] + j for i in span(y0, y1, self.grid[0]) for j in span(x0, x1, self.grid[1])]

    def crop_window(self, count_map: torch.Tensor, index: int) -> torch.Tensor:
        """Block ``index``'s window of a whole count map, zeros outside it."""
        y, x = self.window(index)
        out = count_map.new_zeros((self.map_side, self.map_side), dtype=torch.float64)
        H, W = count_map.shape
        ya, yb, xa, xb = max(y, 0), min(y + self.map_side, H), max(x, 0), min(x + self.map_side, W)
        if ya < yb and xa < xb:
            out[ya - y : yb - y, xa - x : xb - x] = count_map[ya:yb, xa:xb]
        return out

    # ------------------------------------------------------------------ deconvolution

    @property
    def guided(self) -> bool:
        return self.params.guide is not None

    def guide_box(self, index: int) -> tuple[int, int]:
        """First cell (row, col) of block ``index``'s guide: the block and one cell around it."""
        bi, bj = divmod(index, self.grid[1])
        return bi * self.block - 1, bj * self.block - 1

    def guide_blocks_of(self, y0: int, y1: int, x0: int, x1: int) -> list[int]:
        """Blocks whose guide box meets cells [y0, y1) x [x0, x1)."""
        def span(a, b, n):  # box rows [i*block - 1, i*block + block + 1) meet [a, b)
            return range(max(0, (a - 1) // self.block), min(n - 1, b // self.block) + 1)
        if y1 <= y0 or x1 <= x0:
            return []
        return [i * self.grid[1] + j for i in span(y0, y1, self.grid[0]) for j in span(x0, x1, self.grid[1])]

    def crop_guide(self, guide: torch.Tensor, index: int) -> torch.Tensor:
        """Block ``index``'s guide box of a whole guide cell map, zeros outside it."""
        y, x = self.guide_box(index)
        n = self.block + 2
        out = torch.zeros((n, n), dtype=torch.float64, device=guide.device)
        H, W = guide.shape
        ya, yb, xa, xb = max(y, 0), min(y + n, H), max(x, 0), min(x + n, W)
        if ya < yb and xa < xb:
            out[ya - y : yb - y, xa - x : xb - x] = guide[ya:yb, xa:xb]
        return out

    def solve(self, indices: list[int], windows: torch.Tensor,
              guides: torch.Tensor | None = None) -> list[BlockCandidates]:
        """Candidates of blocks ``indices`` from their count-map ``windows`` (N, map_side, map_side)
        and, with a guide, their guide boxes (N, block + 2, block + 2)."""
        if self.guided and guides is None:
            raise ValueError("these LocateParams use the image as a guide: pass the image (locate(..., image=))")
        out = []
        for a in range(0, len(indices), _CHUNK):
            idx = indices[a : a + _CHUNK]
            F = windows[a : a + _CHUNK].to(torch.float64)
            G = guides[a : a + _CHUNK].to(torch.float64) if self.guided else None
            out.extend(self._candidates(self._deconvolve(F, idx), self._block_counts(F, idx), idx, G))
        return out

    def _valid(self, indices, dev) -> torch.Tensor:
        """(N, side, side) mask of window cells inside the image's cell grid."""
        m = torch.zeros((len(indices), self.side, self.side), dtype=torch.float64, device=dev)
        for n, i in enumerate(indices):
            y, x = self.window(i)
            cy, cx = y - 1, x - 1  # first cell of the window
            ya, yb = max(cy, 0) - cy, min(cy + self.side, self.cells[0]) - cy
            xa, xb = max(cx, 0) - cx, min(cx + self.side, self.cells[1]) - cx
            if ya < yb and xa < xb:
                m[n, ya:yb, xa:xb] = 1.0
        return m

    def _deconvolve(self, F: torch.Tensor, indices) -> torch.Tensor:
        """Non-negative ``F = box_k * L`` on the valid cells: Wiener-preconditioned projected
        Landweber steps, from ``L = 0``. The window's box sum is exactly a circular convolution
        of size ``n >= map_side`` (nothing wraps), so each step is two FFTs."""
        k, side = self.k, self.side
        valid = self._valid(indices, F.device)
        n = _fft_size(self.map_side)
        box = torch.zeros((n, n), dtype=torch.float64, device=F.device)
        box[:k, :k] = 1.0
        H = torch.fft.rfft2(box)
        P = H.conj() / (H.abs() ** 2 + self.params.eps * float(k) ** 4)  # regularised inverse
        Fp = torch.nn.functional.pad(F, (0, n - F.shape[-1], 0, n - F.shape[-2]))
        L = torch.zeros_like(valid)
        for _ in range(self.iterations):
            R = Fp - torch.fft.irfft2(torch.fft.rfft2(L, s=(n, n)) * H, s=(n, n))
            R[..., self.map_side :, :] = 0
            R[..., :, self.map_side :] = 0
            dL = torch.fft.irfft2(torch.fft.rfft2(R) * P, s=(n, n))[..., :side, :side]
            L = (L + dL).clamp(min=0) * valid
        return L

    def _block_counts(self, F: torch.Tensor, indices) -> list[float]:
        """Each block's count: the count map's pixels whose window is centred on the block's cells
        (pixel ``Y`` sees cells ``Y - k .. Y - 1``; centre cell ``Y - (k + 1) // 2``; the margins
        past the image go to the edge blocks), / k^2. The blocks partition the map: they add up to
        the count exactly."""
        k, b = self.k, self.block
        first = self.halo - 1 + (k + 1) // 2  # window row of the block's first cell's centre pixel
        out = []
        for n, i in enumerate(indices):
            bi, bj = divmod(i, self.grid[1])
            y0 = 0 if bi == 0 else first
            y1 = self.map_side if bi == self.grid[0] - 1 else first + b
            x0 = 0 if bj == 0 else first
            x1 = self.map_side if bj == self.grid[1] - 1 else first + b
            out.append(float(F[n, y0:y1, x0:x1].sum()) / (k * k))
        return out

    def _candidates(self, L: torch.Tensor, counts: list[float], indices, G) -> list[BlockCandidates]:
        """Maxima inside each block of the picking map (the deconvolved map, smoothed, times the guide
        if any), best first, with the block's count as its mass."""
        h, b = self.halo, self.block
        Ls = _gaussian(L, self.params.smooth) if self.params.smooth else L
        S = torch.nn.functional.pad(Ls, (1, 1, 1, 1))  # window cells -1 .. side, zeros past the window
        if G is not None:  # the guide box of block cells -1 .. b sits at window cells h - 1 .. h + b
            Gw = torch.zeros_like(S)
            Gw[:, h : h + b + 2, h : h + b + 2] = G
            S = S * Gw
        peak = torch.nn.functional.max_pool2d(S[:, None], 2 * _NMS + 1, stride=1)[:, 0]  # window cells 0 .. side-1
        mass3 = _box3(L)
        ys = torch.arange(-1, 2, dtype=torch.float64, device=L.device)
        out = []
        for n, i in enumerate(indices):
            bi, bj = divmod(i, self.grid[1])
            inner = S[n, h + 1 : h + b + 1, h + 1 : h + b + 1]
            is_max = (inner >= peak[n, h : h + b, h : h + b]) & (Ls[n, h : h + b, h : h + b] > _MIN_PEAK) & (inner > 0)
            mass = counts[n]
            r, c = torch.nonzero(is_max, as_tuple=True)
            if len(r) == 0 and mass > 0:  # no interior maximum: its largest cell (of the map if the guide is 0)
                pick = inner if bool((inner > 0).any()) else Ls[n, h : h + b, h : h + b]
                if not bool((pick > 0).any()):
                    pick = None
            else:
                pick = None
            if pick is not None:
                j = int(torch.argmax(pick))
                r, c = torch.tensor([j // b], device=L.device), torch.tensor([j % b], device=L.device)
            score = mass3[n, h : h + b, h : h + b][r, c]
            rank = inner[r, c] if G is not None else score
            # best first; equal values in raster order (deterministic)
            order = np.lexsort((c.cpu().numpy(), r.cpu().numpy(), -rank.cpu().numpy()))
            keep = order[: int(np.ceil(max(mass, 0.0) * 1.5)) + _SPARE]
            r, c, score = r[keep], c[keep], score[keep]
            # sub-cell position: centroid of the picking map over the 3 x 3 around the maximum
            nb = torch.stack([S[n, r + h + 1 + dy, c + h + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], -1)
            nb = nb.reshape(-1, 3, 3)
            tot = nb.sum((1, 2)).clamp(min=1e-300)
            oy = (nb.sum(2) * ys).sum(1) / tot
            ox = (nb.sum(1) * ys).sum(1) / tot
            cy = (bi * b + r).to(torch.float64) + oy
            cx = (bj * b + c).to(torch.float64) + ox
            s = self.g.stride
            coords = torch.stack([cy * s + (s - 1) / 2, cx * s + (s - 1) / 2], 1).cpu().numpy()
            out.append(BlockCandidates(i, mass, coords.reshape(-1, 2), score.cpu().numpy()))
        return out

    # ------------------------------------------------------------------ points

    def finish(self, blocks: list[BlockCandidates], total: float) -> Points:
        """Points from every block's candidates, ``round(total)`` of them (see the module docstring)."""
        blocks = sorted(blocks, key=lambda c: c.index)
        n_total = max(0, int(round(total))) if np.isfinite(total) else 0
        # a block with nothing deconvolved in it (no candidate) passes its share to the others
        masses = np.array([max(c.mass, 0.0) if len(c.scores) else 0.0 for c in blocks])
        counts = _largest_remainder(masses, n_total)
        coords, scores = [], []
        for c, n in zip(blocks, counts):
            if n == 0 or len(c.scores) == 0:
                continue
            take = np.arange(n) % len(c.scores)  # more objects than maxima: the best ones hold several
            coords.append(c.coords[take])
            scores.append(c.scores[take])
        if not coords:
            return Points(np.zeros((0, 2)), np.zeros(0))
        return Points(np.concatenate(coords), np.concatenate(scores))


def _largest_remainder(masses: np.ndarray, n_total: int) -> np.ndarray:
    """Whole counts per block adding up to ``n_total``, each the floor or ceil of its share."""
    s = masses.sum()
    if n_total == 0 or s <= 0:
        return np.zeros(len(masses), dtype=np.int64)
    q = masses * (n_total / s)
    base = np.floor(q).astype(np.int64)
    rest = n_total - int(base.sum())
    frac = q - base
    order = np.lexsort((np.arange(len(q)), -frac))  # largest remainder first; ties: lower block
    base[order[:rest]] += 1
    return base


def _fft_size(m: int) -> int:
    """The smallest 2^a 3^b 5^c >= m (fast FFT sizes)."""
    n = m
    while True:
        x = n
        for p in (2, 3, 5):
            while x % p == 0:
                x //= p
        if x == 1:
            return n
        n += 1


def _box_valid(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    c = torch.cumsum(x, dim)
    n = x.shape[dim]
    head = c.narrow(dim, k - 1, 1)
    rest = c.narrow(dim, k, n - k) - c.narrow(dim, 0, n - k)
    return torch.cat([head, rest], dim)


def _box3(L: torch.Tensor) -> torch.Tensor:
    """3 x 3 sums (zeros outside)."""
    p = torch.nn.functional.pad(L[:, None], (1, 1, 1, 1))[:, 0]
    return _box_valid(_box_valid(p, 3, -1), 3, -2)


def _taps(sigma: float, m: int) -> tuple[list[float], list[float]]:
    """A normalised Gaussian's taps over -m..m and its second derivative's."""
    x = np.arange(-m, m + 1, dtype=np.float64)
    g = np.exp(-x * x / (2 * sigma * sigma))
    g /= g.sum()
    return g.tolist(), ((x * x / sigma ** 4 - 1 / sigma ** 2) * g).tolist()


def _correlate_valid(a: torch.Tensor, taps: list[float], dim: int) -> torch.Tensor:
    """Valid correlation along ``dim``, summed tap by tap in one fixed order: every output is the
    same sum of the same numbers wherever it lies, so a tile equals the whole image bit for bit."""
    n = a.shape[dim] - len(taps) + 1
    out = a.narrow(dim, 0, n) * taps[0]
    for j in range(1, len(taps)):
        out = out + a.narrow(dim, j, n) * taps[j]
    return out


def _gaussian(L: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, h, w) smoothed by a Gaussian (zeros outside)."""
    m = max(1, int(np.ceil(3 * sigma)))
    g, _ = _taps(sigma, m)
    p = torch.nn.functional.pad(L, (m, m, m, m))
    return _correlate_valid(_correlate_valid(p, g, -1), g, -2)


def guide_span(a: int, b: int, n: int, reach: int, stride: int) -> tuple[int, int, int, int]:
    """For image rows [a, b) of an ``n``-row image: (pad_before, pad_after, first cell, end cell) of the
    guide they determine. Past the image border the rows are edge-replicated (by ``reach``, plus the
    last cell's rows past the image); inside, the response needs ``reach`` real rows each side."""
    n_cells = -(-n // stride)
    pad0 = reach if a == 0 else 0
    pad1 = reach + n_cells * stride - n if b == n else 0
    lo, hi = a + (0 if a == 0 else reach), b + (n_cells * stride - n if b == n else -reach)
    return pad0, pad1, -(-lo // stride), max(hi // stride, -(-lo // stride))


def guide_cells(pixels: torch.Tensor, params: LocateParams, stride: int, origin: tuple[int, int],
                shape: tuple[int, int]) -> tuple[int, int, torch.Tensor]:
    """The guide (the image's blob response, >= 0, per cell) that ``pixels`` (C, h, w), the image's rows
    and cols from ``origin`` of an image of ``shape``, determine exactly: (first cell row, col, values)."""
    m, s = params.reach(), stride
    (y0, x0), (H, W) = origin, shape
    h, w = pixels.shape[-2:]
    py0, py1, cy0, cy1 = guide_span(y0, y0 + h, H, m, s)
    px0, px1, cx0, cx1 = guide_span(x0, x0 + w, W, m, s)
    if cy1 <= cy0 or cx1 <= cx0:
        return cy0, cx0, pixels.new_zeros((max(cy1 - cy0, 0), max(cx1 - cx0, 0)), dtype=torch.float64)
    gray = pixels.to(torch.float64).mean(0) / 255.0
    gray = torch.nn.functional.pad(gray[None, None], (px0, px1, py0, py1), mode="replicate")[0, 0]
    g, g2 = _taps(params.guide_sigma, m)
    lap = _correlate_valid(_correlate_valid(gray, g2, 0), g, 1) + _correlate_valid(_correlate_valid(gray, g, 0), g2, 1)
    resp = lap * (params.guide_sigma ** 2 if params.guide == "dark" else -params.guide_sigma ** 2)
    # lap's row 0 is image row y0 + (reach if y0 > 0 else 0) (with the padding: the padded first row + reach)
    ry, rx = cy0 * s - (y0 + (0 if y0 == 0 else m)), cx0 * s - (x0 + (0 if x0 == 0 else m))
    resp = resp[ry : ry + (cy1 - cy0) * s, rx : rx + (cx1 - cx0) * s].clamp(min=0)
    if s > 1:  # mean over each cell's s x s pixels, in a fixed order
        rows = resp[0::s]
        for i in range(1, s):
            rows = rows + resp[i::s]
        resp = rows[:, 0::s]
        for i in range(1, s):
            resp = resp + rows[:, i::s]
        resp = resp / (s * s)
    return cy0, cx0, resp


def locate(count_map, *, patch_size: int = 32, stride: int = 1, block: int = DEFAULT_BLOCK,
           halo: int | None = None, iterations: int = DEFAULT_ITERATIONS, total: float | None = None,
           image=None, params: LocateParams | None = None) -> Points:
    """Object positions from one image's count map.

    Args:
        count_map: ``(H', W')`` (or ``(1, 1, H', W')``) count map of an image, as
            the model returns it (``H' = ceil((H + r) / s)``).
        patch_size, stride: the model's geometry (``model.patch_size``, ``model.stride``).
        block: side in input pixels of the blocks points are counted in (a
            multiple of the stride). halo: input pixels of count-map context
            past each block (default 2r). iterations: deconvolution steps.
        total: the count the points must add up to (default: the map's count,
            ``sum / (r/s)^2``).
        image: the image the map was counted from (``HxWx3`` uint8 array or a
            ``CHW``/``NCHW`` tensor of 0..255 intensities); needed when ``params`` use a guide.
        params: ``LocateParams`` (default: ``LocateParams()``, no guide); a model's own are
            ``LocateParams.of(model)``.

    Returns:
        ``Points(coords, scores)``: (N, 2) float64 (row, col) input-pixel
        positions (pixel ``p``'s centre at ``p``) and a score per point, with
        ``N = round(total)`` (0 if it is negative).
    """
    g = Geometry(patch_size, stride)
    F = _as_count_map(count_map)
    params = LocateParams() if params is None else params
    pixels = None
    if image is not None:
        pixels = image_to_tensor(image, 3)
        if pixels.shape[0] != 1:
            raise ValueError(f"image must be one image, got a batch of {pixels.shape[0]}")
        pixels = pixels[0]
        Hc, Wc = pixels.shape[-2:]
    else:
        Hc, Wc = F.shape[0] * g.stride - g.r, F.shape[1] * g.stride - g.r  # input sides up to the stride
    loc = Locator(max(Hc, 1), max(Wc, 1), g, block=block, halo=halo, iterations=iterations, params=params)
    if loc.map_shape != tuple(F.shape):
        what = f"an image of {Hc}x{Wc}" if pixels is not None else f"patch_size={patch_size}, stride={stride}"
        raise ValueError(f"count_map of shape {tuple(F.shape)} is not a count map of {what} "
                         f"(expected {loc.map_shape}; sides must be >= {g.r // g.stride + 1})")
    guide = None
    if loc.guided:
        if pixels is None:
            raise ValueError(f"params guide={params.guide!r} locates with the image: pass image=")
        guide = guide_cells(pixels, params, g.stride, (0, 0), (Hc, Wc))[2]
    idx = list(range(loc.n_blocks))
    cands = []
    for a in range(0, len(idx), _CHUNK):
        part = idx[a : a + _CHUNK]
        G = torch.stack([loc.crop_guide(guide, i) for i in part]) if guide is not None else None
        cands += loc.solve(part, torch.stack([loc.crop_window(F, i) for i in part]), G)
    if total is None:
        total = float(F.sum()) / g.redundancy
    return loc.finish(cands, float(total))


def _as_count_map(count_map) -> torch.Tensor:
    if isinstance(count_map, np.ndarray):
        count_map = torch.from_numpy(np.ascontiguousarray(count_map))
    if not isinstance(count_map, torch.Tensor):
        raise TypeError(f"count_map must be a torch.Tensor or numpy.ndarray, got {type(count_map).__name__}")
    if count_map.dim() == 4 and count_map.shape[:2] == (1, 1):
        count_map = count_map[0, 0]
    if count_map.dim() != 2:
        raise ValueError(f"count_map must be (H, W) or (1, 1, H, W), got shape {tuple(count_map.shape)}")
    if count_map.is_complex() or count_map.dtype == torch.bool:
        raise TypeError(f"count_map must be real, got dtype {count_map.dtype}")
    F = count_map.detach().to(torch.float64)
    if not bool(torch.isfinite(F).all()):
        raise ValueError("count_map contains NaN or infinite values")
    return F
