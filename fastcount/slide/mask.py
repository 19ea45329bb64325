"""Tissue / foreground mask on a low-resolution level.

``auto_mask`` thresholds a thumbnail with Otsu's method. The polarity is
decided from the thumbnail itself: a light background (brightfield: H&E, IHC)
makes tissue the pixels that are darker or more saturated than the background;
a dark background (fluorescence) makes foreground the pixels brighter than it.
The mask is then dilated by a safety margin so that objects at the tissue
edge, and the halo a tile reads, are never cut off.

A masked-out tile contributes 0 to the count and is never read at full
resolution; this is the one deliberate departure from whole-image counting.
"""
from __future__ import annotations

import numpy as np

__all__ = ["otsu_threshold", "auto_mask", "SlideMask", "prepare_mask"]

# Below this intensity spread (0..255) a thumbnail has no foreground/background
# contrast worth thresholding: keep everything rather than guess.
MIN_CONTRAST = 8.0


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 0..255 values (histogram with 256 bins)."""
    v = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0, 255)
    hist = np.bincount(v.astype(np.int64), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mt = mu[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between)) + 0.5


def _dilate(m: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2 radius + 1)^2 square, via running maxima (separable)."""
    if radius <= 0:
        return m
    out = m.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for d in range(1, radius + 1):
            if d >= n:
                break
            sl_a = [slice(None)] * 2
            sl_b = [slice(None)] * 2
            sl_a[axis], sl_b[axis] = slice(d, None), slice(None, -d)
            out[tuple(sl_a)] |= src[tuple(sl_b)]
            out[tuple(sl_b)] |= src[tuple(sl_a)]
    return out


def auto_mask(thumb: np.ndarray, dilate: int = 2) -> tuple[np.ndarray, dict]:
    """Foreground mask of an (h, w, 3) thumbnail and how it was decided."""
    t = np.asarray(thumb, dtype=np.float32)
    mean = t.mean(axis=2)
    light_bg = float(np.median(mean)) >= 127.5
    if light_bg:
        # Tissue is darker and/or more saturated than a white/grey background.
        score = np.maximum(255.0 - t.min(axis=2), t.max(axis=2) - t.min(axis=2))
    else:
        # Fluorescence: signal may be in one channel only (e.g. DAPI in blue).
        score = t.max(axis=2)
    info = {"kind": "brightfield" if light_bg else "fluorescence"}
    th = otsu_threshold(score) if score.size else 0.0
    m = score > th
    # Contrast = distance between the two classes' means; below MIN_CONTRAST the split is
    # just noise (a blank or uniform image): keep everything rather than guess.
    if not m.any() or m.all() or float(score[m].mean() - score[~m].mean()) < MIN_CONTRAST:
        info.update(threshold=None, note="no contrast: every tile kept")
        return np.ones(score.shape, dtype=bool), info
    info["threshold"] = th
    return _dilate(m, dilate), info


class SlideMask:
    """A boolean mask over an ``H x W`` image, at its own (lower) resolution,
    answering "is any pixel of this input box foreground?" in O(1)."""

    def __init__(self, mask: np.ndarray, height: int, width: int):
        self.mask = mask
        self.height, self.width = height, width
        mh, mw = mask.shape
        self.sy, self.sx = height / mh, width / mw
        self._sat = np.zeros((mh + 1, mw + 1), dtype=np.int64)
        self._sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def any(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        mh, mw = self.mask.shape
        a = min(max(int(np.floor(y0 / self.sy)), 0), mh - 1)
        b = min(max(int(np.ceil(y1 / self.sy)), a + 1), mh)
        c = min(max(int(np.floor(x0 / self.sx)), 0), mw - 1)
        d = min(max(int(np.ceil(x1 / self.sx)), c + 1), mw)
        s = self._sat
        return bool(s[b, d] - s[a, d] - s[b, c] + s[a, c] > 0)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())


def prepare_mask(mask, height: int, width: int) -> np.ndarray:
    """Validate a user mask: 2-D boolean (or 0/1) array with the image's aspect ratio."""
    if hasattr(mask, "compute"):
        mask = mask.compute()
    if not hasattr(mask, "shape"):
        raise TypeError(f"mask must be None, 'auto' or a 2-D boolean array, got {type(mask).__name__}")
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be a 2-D boolean array, got shape {m.shape}")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "uif" or not np.isin(np.unique(m), (0, 1)).all():
            raise TypeError(f"mask must be boolean (or 0/1), got dtype {m.dtype}")
        m = m.astype(bool)
    mh, mw = m.shape
    if mh < 1 or mw < 1:
        raise ValueError(f"mask is empty: shape {m.shape}")
    # Any resolution, but one scale for both axes (a thumbnail's sides round separately: allow 1 px).
    if abs(mh - height * mw / width) > 1 + 1e-9 and abs(mw - width * mh / height) > 1 + 1e-9:
        raise ValueError(
            f"mask shape {m.shape} does not match the image ({height}, {width}) at any single scale "
            f"(expected e.g. ({height}, {width}) or a downscaled ({round(height * mw / width)}, {mw}))"
        )
    return m
