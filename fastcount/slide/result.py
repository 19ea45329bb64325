"""``SlideCount``: the total, the density grid, and its exports.

The density grid sums the count map over ``cell x cell`` blocks of count-map
pixels (divided by the redundancy), so it adds up to the total. Count-map
pixel ``Y`` (full resolution) sees input rows ``Y - r .. Y``; its window is
centred on image row ``Y - r/2``. Exports place block ``(i, j)`` over the
image accordingly: level-0 rows ``(i * cell * s - r/2) * (H0 / H)`` onwards (each
axis scales by its own level-0 / counted-level size ratio).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_path
from ..geometry import Geometry

__all__ = ["SlideCount", "colormap"]

# Anchor colours of a perceptually ordered map (viridis-like), interpolated to 256 entries.
_ANCHORS = np.array([
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37),
], dtype=np.float64)


def colormap(v: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8."""
    v = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64)), 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(v.astype(np.int64), len(_ANCHORS) - 2)
    f = (v - i)[..., None]
    return np.round(_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).astype(np.uint8)


@dataclass
class SlideCount:
    """Result of ``count_slide``.

    Attributes:
        total: the count (float; sum over tiles in float64 / (r/s)^2).
        density: float64 ``(ceil(H'/cell), ceil(W'/cell))`` counts per
            ``cell x cell`` block of the count map; ``density.sum() == total``
            up to float rounding.
        cell: block side in count-map pixels (one count-map pixel = ``stride``
            image pixels at the counted level).
        stats: timings and sizes (``tiles_processed``, ``tiles_skipped``,
            ``seconds``, ``megapixels_per_s``, ``peak_rss_mb``, ...).
    """

    total: float
    density: np.ndarray
    cell: int
    stats: dict
    source: str = ""
    level: int = 0
    shape: tuple = (0, 0)  # (H, W) at the counted level
    downsample: float = 1.0  # counted level -> level 0
    level0_shape: tuple | None = None  # (H, W) at level 0; None: taken as shape * downsample
    patch_size: int = 32
    stride: int = 1
    mpp: float | None = None
    thumbnail: np.ndarray | None = field(default=None, repr=False)
    # count_slide(points=True): level-0 (x, y) of each object, pixel (c, r) covering
    # [c, c + 1) x [r, r + 1) as in QuPath (a pixel centre is (c + 0.5, r + 0.5)); and scores.
    points: np.ndarray | None = field(default=None, repr=False)
    point_scores: np.ndarray | None = field(default=None, repr=False)

    def __float__(self):
        return float(self.total)

    def __repr__(self):
        return (f"SlideCount(total={self.total:.2f}, source={self.source!r}, level={self.level}, "
                f"shape={tuple(self.shape)}, density={self.density.shape}, cell={self.cell})")

    # ----------------------------------------------------------------- geometry of blocks

    def level0_scale(self) -> tuple[float, float]:
        """(y, x) factors from counted-level to level-0 pixels. Pyramid levels round their
        sides, so each axis has its own ratio; the mean ``downsample`` would push the far
        edge past the level-0 image."""
        if self.level0_shape is None:
            return float(self.downsample), float(self.downsample)
        return self.level0_shape[0] / self.shape[0], self.level0_shape[1] / self.shape[1]

    @property
    def window_offset(self) -> float:
        """Count-map row (full resolution) ``Y``'s window is centred on image row ``Y - window_offset``."""
        return Geometry(self.patch_size, self.stride).window_offset

    def block_box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Image box (y0, x0, y1, x1) of density block (i, j) at the counted level, clipped to the image."""
        side = self.cell * self.stride
        off = self.window_offset
        H, W = self.shape
        y0, x0 = max(i * side - off, 0.0), max(j * side - off, 0.0)
        y1, x1 = min((i + 1) * side - off, H), min((j + 1) * side - off, W)
        # A block wholly in the count map's margin past the far edge (small cells only) keeps
        # a 1-px strip at the edge, so every count stays on the image.
        if y1 <= y0:
            y0, y1 = max(H - 1.0, 0.0), float(H)
        if x1 <= x0:
            x0, x1 = max(W - 1.0, 0.0), float(W)
        return y0, x0, y1, x1

    # ----------------------------------------------------------------- points

    def set_points(self, located):
        """Store ``fastcount.locate`` points (counted-level (row, col), pixel centres at whole
        numbers) as level-0 (x, y) in the pixel-area convention of ``points``."""
        sy, sx = self.level0_scale()
        rc = np.asarray(located.coords, dtype=np.float64).reshape(-1, 2)
        self.points = np.stack([(rc[:, 1] + 0.5) * sx, (rc[:, 0] + 0.5) * sy], 1)
        self.point_scores = np.asarray(located.scores, dtype=np.float64).reshape(-1)

    def _require_points(self, what: str):
        if self.points is None:
            raise ValueError(f"{what} needs points: run count_slide(..., points=True)")

    def to_csv(self, path):
        """Write the points as CSV ``x,y,score`` (level-0 pixels, see ``points``)."""
        self._require_points("to_csv")
        lines = ["x,y,score"] + [f"{x:.3f},{y:.3f},{s:.4f}" for (x, y), s in zip(self.points, self.point_scores)]
        _atomic_write_text(Path(path), "\n".join(lines) + "\n")
        return Path(path)

    def _point_features(self) -> list:
        return [{
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": "Cell", "color": [0, 200, 0]},
                "measurements": {"Score": float(s)},
            },
        } for (x, y), s in zip(self.points, self.point_scores)]

    # ----------------------------------------------------------------- exports

    def to_dict(self) -> dict:
        return {
            "total": float(self.total),
            "source": self.source,
            "level": self.level,
            "shape": list(self.shape),
            "downsample": self.downsample,
            "level0_shape": None if self.level0_shape is None else list(self.level0_shape),
            "mpp": self.mpp,
            "patch_size": self.patch_size,
            "stride": self.stride,
            "cell": self.cell,
            "density_shape": list(self.density.shape),
            "density": self.density.tolist(),
            "stats": {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in self.stats.items()},
        }

    def to_json(self, path=None, include_density: bool = True) -> str:
        """JSON text of the result (the density grid as nested lists unless ``include_density=False``);
        written to ``path`` as well when given."""
        d = self.to_dict()
        if not include_density:
            d.pop("density")
        text = json.dumps(d)
        if path is not None:
            _atomic_write_text(Path(path), text)
        return text

    def to_geojson(self, path=None, min_count: float = 0.0, points: bool = False) -> dict:
        """The density grid as a QuPath-importable GeoJSON FeatureCollection.

        One rectangular ``Polygon`` per block whose count exceeds ``min_count``
        (a number; ``-inf`` keeps every block), in level-0 pixel coordinates
        (x, y), with ``properties.objectType = "tile"`` and a ``"Count"``
        measurement (QuPath 0.4+ dict form). ``points=True``: the points
        instead, one ``Point`` per object with ``objectType = "detection"``,
        classification ``"Cell"`` and a ``"Score"`` measurement.
        """
        if points:
            self._require_points("to_geojson(points=True)")
            gj = {"type": "FeatureCollection", "features": self._point_features()}
            if path is not None:
                _atomic_write_text(Path(path), json.dumps(gj))
            return gj
        if isinstance(min_count, bool) or not isinstance(min_count, (int, float, np.integer, np.floating)) \
                or math.isnan(min_count):
            raise TypeError(f"min_count must be a number (counts per block), got {min_count!r}")
        feats = []
        sy, sx = self.level0_scale()
        for i, j in zip(*np.nonzero(self.density > min_count)):
            y0, x0, y1, x1 = self.block_box(int(i), int(j))
            y0, y1, x0, x1 = y0 * sy, y1 * sy, x0 * sx, x1 * sx
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            feats.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "classification": {"name": "Density", "color": [255, 0, 0]},
                    "measurements": {"Count": float(self.density[i, j])},
                },
            })
        gj = {"type": "FeatureCollection", "features": feats}
        if path is not None:
            _atomic_write_text(Path(path), json.dumps(gj))
        return gj

    def save_heatmap(self, path, alpha: float = 0.55, max_side: int = 1024, points: bool = False):
        """PNG: the density over a thumbnail of the slide, with a colour bar (counts per block);
        ``points=True`` also marks each point (a small red ring)."""
        if points:
            self._require_points("save_heatmap(points=True)")
        H, W = self.shape
        scale = min(1.0, max_side / max(H, W))
        th, tw = max(1, int(round(H * scale))), max(1, int(round(W * scale)))
        if self.thumbnail is not None:
            base = np.asarray(Image.fromarray(self.thumbnail).resize((tw, th), Image.BILINEAR), dtype=np.float64)
        else:
            base = np.full((th, tw, 3), 128.0)
        # Block of each thumbnail pixel: image row y -> count-map full-res row y + r/2.
        side = self.cell * self.stride
        ys = ((np.arange(th) + 0.5) * H / th + self.window_offset) // side
        xs = ((np.arange(tw) + 0.5) * W / tw + self.window_offset) // side
        ys = np.clip(ys.astype(np.int64), 0, self.density.shape[0] - 1)
        xs = np.clip(xs.astype(np.int64), 0, self.density.shape[1] - 1)
        d = self.density[ys[:, None], xs[None, :]]
        # Robust range; it includes 0 (skipped background) and negative values (an untrained
        # or poorly fitting model can predict them) so nothing is silently clipped to a colour.
        lo, hi = (np.percentile(self.density, [0.5, 99.5]) if self.density.size else (0.0, 0.0))
        vmin, vmax = min(float(lo), 0.0), max(float(hi), 0.0)
        if vmax - vmin <= 0:
            vmax = vmin + 1e-12
        col = colormap((d - vmin) / (vmax - vmin)).astype(np.float64)
        out = np.round((1 - alpha) * base + alpha * col).clip(0, 255).astype(np.uint8)

        # Colour bar on the right, drawn by hand (matplotlib is not a dependency).
        bar_w, pad, label_w = 18, 10, 90
        canvas_h = max(th, 160)
        canvas = Image.new("RGB", (tw + pad + bar_w + label_w, canvas_h + 24), (255, 255, 255))
        canvas.paste(Image.fromarray(out), (0, 0))
        bar_h = min(th, canvas_h) - 4 if th >= 60 else canvas_h - 4
        ramp = colormap(np.linspace(1, 0, bar_h))[:, None, :].repeat(bar_w, axis=1)
        canvas.paste(Image.fromarray(ramp), (tw + pad, 2))
        draw = ImageDraw.Draw(canvas)
        if points:
            _draw_points(draw, self.points, self.level0_scale(), (th / H, tw / W))
        for k in range(5):
            v = vmax - (vmax - vmin) * k / 4
            yy = 2 + int(round(k / 4 * (bar_h - 1)))
            draw.line([(tw + pad + bar_w, yy), (tw + pad + bar_w + 4, yy)], fill=(0, 0, 0))
            draw.text((tw + pad + bar_w + 6, max(0, yy - 6)), _fmt(v), fill=(0, 0, 0))
        px = side * self.downsample
        draw.text((2, canvas_h + 6), f"total {self.total:.1f}; colour: count per {px:g}x{px:g} px (level 0) block",
                  fill=(0, 0, 0))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            canvas.save(tmp, format="PNG")
        return path


def _draw_points(draw, points: np.ndarray, level0_scale, thumb_scale):
    """Rings at the points (level-0 x, y) on a thumbnail scaled by ``thumb_scale`` (y, x) from the counted level."""
    fy, fx = thumb_scale[0] / level0_scale[0], thumb_scale[1] / level0_scale[1]
    rad = 2
    for x, y in points:
        u, v = x * fx, y * fy
        draw.ellipse([u - rad, v - rad, u + rad, v + rad], outline=(255, 0, 0))


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.2f}"


def _atomic_write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
