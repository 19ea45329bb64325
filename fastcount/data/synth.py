"""Synthetic fluorescence cell images and pyramidal slides with exact ground truth.

``cell_image`` simulates images in the style of the VGG cells benchmark
(Lempitsky & Zisserman 2010): a dark, slightly uneven background, blurred
elliptical cells of varying size and brightness that overlap, signal almost
all in the blue channel, and sensor noise. Each cell contributes one dot at
its (integer) centre pixel.

``write_synthetic_slide`` writes a large pyramidal tiled TIFF built from the
same cell model: cells sit inside a few elliptical "tissue" regions on an
empty background. The slide is generated tile by tile (never a whole level
in memory): cell positions are drawn per 256-px generation block from a seed
derived from the block index, so any region at any pyramid level can be
rendered on its own, and the exact total count is known without rendering.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..files import atomic_path

__all__ = ["cell_image", "SyntheticSlide", "write_synthetic_slide", "VGG_DENSITY"]

# Cells per pixel in the VGG benchmark: 176 per 256x256 image on average.
VGG_DENSITY = 176 / 256**2
BLOCK = 256  # generation block side (level-0 px)
# Cell shape, matched to the VGG images (mean profile of isolated annotated cells: a
# flat-topped disc, half maximum about 5 px from the centre, 110-210 above background).
RADIUS = (3.5, 5.5)  # disc radius (px) along the first axis
ASPECT = (0.85, 1.15)  # second radius / first
EDGE = (0.8, 1.4)  # width of the soft (logistic) rim, px
AMP = (110.0, 210.0)  # plateau blue intensity above the background
CHROMA = (0.005, 0.005, 1.0)  # share of the cell signal in R, G, B (VGG: almost pure blue)
REACH = RADIUS[1] * ASPECT[1] + 8 * EDGE[1]  # a cell's signal is negligible beyond this (px)


def _cells(rng: np.random.Generator, n: int, y0: float, x0: float, h: float, w: float) -> np.ndarray:
    """n random cells in the box: rows (cy, cx, ry, rx, theta, amp, edge)."""
    cy = y0 + rng.random(n) * h
    cx = x0 + rng.random(n) * w
    ry = rng.uniform(*RADIUS, n)
    rx = ry * rng.uniform(*ASPECT, n)
    th = rng.uniform(0, math.pi, n)
    amp = rng.uniform(*AMP, n)
    edge = rng.uniform(*EDGE, n)
    return np.stack([cy, cx, ry, rx, th, amp, edge], axis=1)


def _render_cells(out: np.ndarray, cells: np.ndarray, y0: float, x0: float, d: float = 1.0):
    """Add the cells' blue signal to ``out`` (h, w) float32, whose pixel (i, j) is
    level-0 box [y0 + i d, y0 + (i+1) d) x [x0 + j d, ...).

    A cell is an elliptical disc with a logistic rim. At downsample d the radii
    shrink by d, the rim widens by the pixel-box blur (variance 1/12 px^2) and the
    plateau is scaled to keep the cell's mass (area pi (ry rx + pi^2 e^2 / 3) for
    rim width e), so pyramid levels look like averaged level 0 without rendering level 0.
    """
    h, w = out.shape
    for cy, cx, ry, rx, th, amp, edge in cells:
        py, px = (cy - y0) / d - 0.5, (cx - x0) / d - 0.5  # centre in pixel-index coordinates
        ay, ax = ry / d, rx / d
        e = math.sqrt((edge / d) ** 2 + 1 / 12)
        e0 = math.sqrt(edge**2 + 1 / 12)
        k = math.pi**2 / 3
        a = amp * (ry * rx + k * e0 * e0) / d**2 / (ay * ax + k * e * e)
        rad = max(ay, ax) + 8 * e
        i0, i1 = max(int(math.floor(py - rad)), 0), min(int(math.ceil(py + rad)) + 1, h)
        j0, j1 = max(int(math.floor(px - rad)), 0), min(int(math.ceil(px + rad)) + 1, w)
        if i0 >= i1 or j0 >= j1:
            continue
        yy = np.arange(i0, i1, dtype=np.float32)[:, None] - py
        xx = np.arange(j0, j1, dtype=np.float32)[None, :] - px
        c, s = math.cos(th), math.sin(th)
        u, v = c * yy + s * xx, -s * yy + c * xx
        # distance inside the rim (px, positive inside), scaled by the mean radius
        rho = np.sqrt((u / ay) ** 2 + (v / ax) ** 2)
        inside = (1.0 - rho) * (0.5 * (ay + ax))
        out[i0:i1, j0:j1] += a / (1.0 + np.exp(-inside / e))


def _compose(blue_signal: np.ndarray, background: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Signal + background + noise -> (h, w, 3) uint8, signal mostly in blue."""
    h, w = blue_signal.shape
    img = np.empty((h, w, 3), dtype=np.float32)
    for ch in range(3):
        img[:, :, ch] = blue_signal * CHROMA[ch] + background * (1.0 if ch == 2 else 0.01)
        if noise > 0:
            img[:, :, ch] += rng.normal(0, noise * (1.0 if ch == 2 else 0.5), (h, w)).astype(np.float32)
    return np.round(img).clip(0, 255).astype(np.uint8)


def cell_image(size=256, n_cells: int | None = None, seed=None, noise: float = 2.0,
               background: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic fluorescence image and its dot map.

    Args:
        size: side ``n`` or ``(height, width)``.
        n_cells: number of cells (default: Poisson with the VGG mean density).
        seed: int or numpy Generator.
        noise: std of the blue channel's Gaussian noise (R/G get half).
        background: mean blue background level (an uneven illumination is added).

    Returns:
        ``(image (H, W, 3) uint8, dots (H, W) int64)``; ``dots.sum()`` is the
        number of cells (each at its centre pixel; overlaps are not merged).
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if n_cells is None:
        n_cells = int(rng.poisson(VGG_DENSITY * h * w))
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    cells = _cells(rng, n_cells, 0.0, 0.0, h, w)
    sig = np.zeros((h, w), dtype=np.float32)
    _render_cells(sig, cells, 0.0, 0.0)
    # Uneven illumination: a smooth vignette, darker towards one corner.
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    gy, gx = rng.uniform(-0.4, 0.4, 2)
    bg = background * (1.0 + gy * yy + gx * xx - 0.25 * (yy**2 + xx**2))
    img = _compose(sig, bg, rng, noise)
    dots = np.zeros((h, w), dtype=np.int64)
    iy = np.clip(cells[:, 0].astype(np.int64), 0, h - 1)
    ix = np.clip(cells[:, 1].astype(np.int64), 0, w - 1)
    np.add.at(dots, (iy, ix), 1)
    return img, dots


@dataclass(frozen=True)
class SyntheticSlide:
    """A procedurally defined fluorescence slide: any region renders on its own.

    ``tissue_fraction`` of the area is covered by elliptical tissue regions
    (faint autofluorescence ``tissue_level``) holding cells at ``density``
    cells/px; the background outside is ``background`` with ``background_noise``.
    """

    height: int
    width: int
    seed: int = 0
    tissue_fraction: float = 0.1
    n_regions: int = 3
    density: float = VGG_DENSITY
    background: float = 2.0
    background_noise: float = 1.0
    tissue_level: float = 42.0  # VGG images: the blue 10th percentile (background between cells) averages 42
    noise: float = 2.0

    def __post_init__(self):
        for nm in ("height", "width"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        if not 0 <= self.tissue_fraction <= 1:
            raise ValueError(f"tissue_fraction must be in [0, 1], got {self.tissue_fraction}")
        if self.n_regions < 1:
            raise ValueError(f"n_regions must be >= 1, got {self.n_regions}")

    @property
    def regions(self) -> np.ndarray:
        """Tissue ellipses as rows (cy, cx, ry, rx)."""
        return _regions(self.height, self.width, self.seed, self.tissue_fraction, self.n_regions)

    def in_tissue(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        inside = np.zeros(np.broadcast(y, x).shape, dtype=bool)
        for cy, cx, ry, rx in self.regions:
            inside |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        return inside

    def _touches_tissue(self, y0, x0, y1, x1) -> bool:
        for cy, cx, ry, rx in self.regions:
            if cy + ry >= y0 and cy - ry <= y1 and cx + rx >= x0 and cx - rx <= x1:
                return True
        return False

    def block_cells(self, i: int, j: int) -> np.ndarray:
        """Cells whose centre lies in generation block (i, j) (deterministic)."""
        return _block_cells(self, i, j)

    @property
    def total(self) -> int:
        """Exact number of cells (the ground-truth count), computed without rendering."""
        n = 0
        for i in range(math.ceil(self.height / BLOCK)):
            for j in range(math.ceil(self.width / BLOCK)):
                n += len(self.block_cells(i, j))
        return n

    def render(self, y0: int, x0: int, h: int, w: int, downsample: int = 1) -> np.ndarray:
        """Pixels [y0, y0+h) x [x0, x0+w) of the level with this ``downsample`` (h, w, 3) uint8."""
        d = downsample
        Y0, X0, Y1, X1 = y0 * d, x0 * d, (y0 + h) * d, (x0 + w) * d  # level-0 box
        rng = np.random.default_rng([self.seed, 7, d, y0, x0])
        sig = np.zeros((h, w), dtype=np.float32)
        m = REACH + 1
        if not self._touches_tissue(Y0 - m, X0 - m, Y1 + m, X1 + m):
            bg = np.full((h, w), self.background, dtype=np.float32)
            return _compose(sig, bg, rng, self.background_noise / d)
        bi0, bi1 = max(int((Y0 - m) // BLOCK), 0), min(int((Y1 + m) // BLOCK) + 1, math.ceil(self.height / BLOCK))
        bj0, bj1 = max(int((X0 - m) // BLOCK), 0), min(int((X1 + m) // BLOCK) + 1, math.ceil(self.width / BLOCK))
        for i in range(bi0, bi1):
            for j in range(bj0, bj1):
                c = self.block_cells(i, j)
                if len(c):
                    _render_cells(sig, c, Y0, X0, d)
        yy = Y0 + (np.arange(h, dtype=np.float64)[:, None] + 0.5) * d
        xx = X0 + (np.arange(w, dtype=np.float64)[None, :] + 0.5) * d
        tissue = self.in_tissue(yy, xx).astype(np.float32)
        bg = self.background + (self.tissue_level - self.background) * tissue
        # Noise shrinks with averaging at coarser levels.
        noise = np.where(tissue > 0, self.noise, self.background_noise).astype(np.float32) / d
        img = _compose(sig, bg, rng, 0.0).astype(np.float32)
        if noise.max() > 0:
            img[:, :, 2] += rng.normal(0, 1, (h, w)).astype(np.float32) * noise
            img[:, :, :2] += rng.normal(0, 0.5, (h, w, 2)).astype(np.float32) * noise[:, :, None]
        return np.round(img).clip(0, 255).astype(np.uint8)

    def dots(self, y0: int = 0, x0: int = 0, h: int | None = None, w: int | None = None) -> np.ndarray:
        """Dot map of a level-0 region (int64), for tests on small slides."""
        h = self.height - y0 if h is None else h
        w = self.width - x0 if w is None else w
        out = np.zeros((h, w), dtype=np.int64)
        for i in range(y0 // BLOCK, math.ceil((y0 + h) / BLOCK)):
            for j in range(x0 // BLOCK, math.ceil((x0 + w) / BLOCK)):
                c = self.block_cells(i, j)
                if len(c):
                    iy, ix = c[:, 0].astype(np.int64) - y0, c[:, 1].astype(np.int64) - x0
                    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                    np.add.at(out, (iy[ok], ix[ok]), 1)
        return out


@lru_cache(maxsize=64)
def _regions(height, width, seed, fraction, n):
    rng = np.random.default_rng([seed, 1])
    if fraction == 0:
        return np.zeros((0, 4))
    weights = rng.uniform(0.5, 1.5, n)
    areas = fraction * height * width * weights / weights.sum()
    out = []
    for a in areas:
        aspect = rng.uniform(0.6, 1.6)
        ry, rx = math.sqrt(a / math.pi * aspect), math.sqrt(a / math.pi / aspect)
        ry, rx = min(ry, height / 2), min(rx, width / 2)
        cy = rng.uniform(ry, height - ry) if height > 2 * ry else height / 2
        cx = rng.uniform(rx, width - rx) if width > 2 * rx else width / 2
        out.append((cy, cx, ry, rx))
    return np.array(out)


@lru_cache(maxsize=4096)
def _block_cells(slide: SyntheticSlide, i: int, j: int) -> np.ndarray:
    y0, x0 = i * BLOCK, j * BLOCK
    h, w = min(BLOCK, slide.height - y0), min(BLOCK, slide.width - x0)
    if h <= 0 or w <= 0 or not slide._touches_tissue(y0, x0, y0 + h, x0 + w):
        return np.zeros((0, 6))
    rng = np.random.default_rng([slide.seed, 2, i, j])
    c = _cells(rng, int(rng.poisson(slide.density * h * w)), y0, x0, h, w)
    return c[slide.in_tissue(c[:, 0], c[:, 1])]


def write_synthetic_slide(path, size=4096, *, seed: int = 0, tile: int = 256, tissue_fraction: float = 0.1,
                          n_regions: int = 3, mpp: float = 0.5, compression: str = "zlib", min_level_side: int = 256,
                          background_noise: float = 1.0, progress: bool = False) -> dict:
    """Write a pyramidal tiled TIFF (SubIFD pyramid, 2x per level) of a ``SyntheticSlide``.

    Tiles are rendered and written one at a time, so memory stays at a few
    tiles whatever ``size`` is. Returns a dict with ``path``, ``shape``,
    ``levels`` and ``total`` (the exact ground-truth cell count).
    """
    import tifffile

    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (TIFF tiles), got {tile}")
    slide = SyntheticSlide(int(h), int(w), seed=seed, tissue_fraction=tissue_fraction, n_regions=n_regions,
                           background_noise=background_noise)
    shapes = [(slide.height, slide.width)]
    while max(shapes[-1]) > min_level_side and min(shapes[-1]) > 1:
        shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(math.ceil(a / tile) * math.ceil(b / tile) for a, b in shapes), unit="tile",
                   desc="write slide")

    def tiles(level):
        d = 2**level
        lh, lw = shapes[level]
        for y in range(0, lh, tile):
            for x in range(0, lw, tile):
                th, tw = min(tile, lh - y), min(tile, lw - x)
                a = slide.render(y, x, th, tw, d)
                if (th, tw) != (tile, tile):  # TIFF edge tiles are stored full size
                    a = np.pad(a, ((0, tile - th), (0, tile - tw), (0, 0)))
                if bar is not None:
                    bar.update(1)
                yield a

    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        opts = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression=compression,
                    resolutionunit="CENTIMETER", metadata=None)
        tif.write(tiles(0), shape=(*shapes[0], 3), subifds=len(shapes) - 1, resolution=res,
                  description=f"fastcount synthetic slide seed={seed} MPP = {mpp}", **opts)
        for lv in range(1, len(shapes)):
            d = 2**lv
            tif.write(tiles(lv), shape=(*shapes[lv], 3), subfiletype=1, resolution=(res[0] / d, res[1] / d), **opts)
    if bar is not None:
        bar.close()
    return {"path": path, "shape": shapes[0], "levels": shapes, "total": slide.total, "mpp": mpp, "slide": slide}
