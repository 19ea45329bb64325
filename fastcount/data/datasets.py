"""Datasets of images with dot annotations.

``load_dataset(name, root)`` returns a ``DotDataset``: a sequence of
``(image HxWx3, dots HxW int64)`` pairs in sorted file order; images are uint8 (float32 0..255
for 16-bit files, by the pixel rule of ``fastcount.pixels``).

Dot annotations are read from
- exact dot images: RGB with pure red dots (255, 0, 0) (VGG cells), or
  1-bit / grayscale images where a non-zero pixel is a dot (MBM);
- lossy dot images (JPEG): a dot is a strongly red pixel, R - max(G, B) at
  least ``red_threshold`` (default 100). Single-pixel dots survive JPEG
  only without chroma subsampling (4:4:4); at quality >= 75 the default
  threshold recovers VGG's dots exactly (tested). With 4:2:0 subsampling a
  one-pixel dot is smeared below any usable threshold: save dot JPEGs 4:4:4;
- point lists: CSV of ``row,col`` (a header line is allowed) or GeoJSON
  Point features (x = col, y = row).
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..pixels import read_image_file

__all__ = ["DotDataset", "load_dataset", "read_image", "read_dots", "TEST_SIZE", "DATASETS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_EXTS = (".jpg", ".jpeg")
POINT_EXTS = (".csv", ".geojson", ".json")
DATASETS = ("vgg_cells", "mbm", "folder")
# Size of the reference held-out test set (the last images in sorted order).
TEST_SIZE = {"vgg_cells": 100, "mbm": 11}
DEFAULT_RED_THRESHOLD = 100


class DotDataset(Sequence):
    """Images and dot maps held in memory, with their file names."""

    def __init__(self, images, dots, names, name="folder"):
        self.images = list(images)
        self.dots = list(dots)
        self.names = list(names)
        self.name = name

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return DotDataset(self.images[i], self.dots[i], self.names[i], self.name)
        return self.images[i], self.dots[i]

    def subset(self, indices):
        idx = [int(i) for i in indices]
        return DotDataset([self.images[i] for i in idx], [self.dots[i] for i in idx], [self.names[i] for i in idx], self.name)

    @property
    def counts(self) -> np.ndarray:
        return np.array([int(d.sum()) for d in self.dots], dtype=np.int64)

    @property
    def test_size(self) -> int:
        return TEST_SIZE.get(self.name, 0)

    def __repr__(self):
        return f"DotDataset(name={self.name!r}, images={len(self)}, dots={int(self.counts.sum())})"


def read_image(path) -> np.ndarray:
    """An image file as HxWx3 0..255 intensities by the one pixel rule of ``fastcount.pixels``:
    uint8 for 8-bit files, float32 for 16-bit (x / 257) and float files."""
    return read_image_file(path)


def _redness(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int16)
    return a[..., 0] - np.maximum(a[..., 1], a[..., 2])


def read_dots(path, shape=None, red_threshold: float = DEFAULT_RED_THRESHOLD) -> np.ndarray:
    """A dot annotation file as an HxW int64 count map.

    Args:
        path: dot image (PNG/TIFF/BMP exact, JPEG lossy) or point list (CSV/GeoJSON).
        shape: (H, W) of the image; required for point lists, checked for dot images.
        red_threshold: minimum R - max(G, B) (0..255) for a red dot pixel; for
            grayscale JPEG dot images, the minimum value. Exact PNG/TIFF dots
            (255, 0, 0) or non-zero 1-bit pixels pass any threshold.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dot annotation file not found: {path}")
    if not 0 < red_threshold <= 255:
        raise ValueError(f"red_threshold must be in (0, 255], got {red_threshold}")
    ext = path.suffix.lower()
    if ext in POINT_EXTS:
        if shape is None:
            raise ValueError(f"shape=(H, W) is needed to read the point list {path}")
        pts = _read_points(path)
        dots = np.zeros(shape, dtype=np.int64)
        if len(pts):
            r, c = pts[:, 0], pts[:, 1]
            bad = (r < 0) | (r >= shape[0]) | (c < 0) | (c >= shape[1])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{path}: point {i} = (row {r[i]}, col {c[i]}) lies outside the image {tuple(shape)}")
            np.add.at(dots, (r, c), 1)
        return dots
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            a = np.array(im.convert("RGB") if mode not in ("1", "L", "I;16", "I") else im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read dot annotations from {path}: {e}") from e
    if shape is not None and tuple(a.shape[:2]) != tuple(shape):
        raise ValueError(f"dot image {path} has shape {a.shape[:2]}, the image has {tuple(shape)}")
    if a.ndim == 2:  # 1-bit or grayscale: a non-zero (lossy: bright) pixel is a dot
        return (a >= red_threshold if ext in LOSSY_EXTS else a > 0).astype(np.int64)
    return (_redness(a) >= red_threshold).astype(np.int64)


def _read_points(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".csv":
        rows = []
        with open(path, newline="") as f:
            for i, rec in enumerate(csv.reader(f)):
                if not rec or not "".join(rec).strip():
                    continue
                try:
                    rows.append((int(round(float(rec[0]))), int(round(float(rec[1])))))
                except (ValueError, IndexError):
                    if i == 0:
                        continue  # header line
                    raise ValueError(f"{path}:{i + 1}: expected 'row,col', got {rec!r}") from None
        return np.array(rows, dtype=np.int64).reshape(-1, 2)
    try:
        gj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid GeoJSON: {e}") from e
    feats = gj.get("features", [gj]) if isinstance(gj, dict) else gj
    rows = []
    for f in feats:
        geom = f.get("geometry", f) if isinstance(f, dict) else None
        if not geom or geom.get("type") not in ("Point", "MultiPoint"):
            continue
        coords = [geom["coordinates"]] if geom["type"] == "Point" else geom["coordinates"]
        rows.extend((int(round(y)), int(round(x))) for x, y, *_ in coords)
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _halve(image: np.ndarray, dots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 mean-pool the image and 2x2 sum-pool the dots (an odd edge is padded, never dropped)."""
    h, w = dots.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")
        dots = np.pad(dots, ((0, ph), (0, pw)))  # pad with zero dots: none is lost
    h2, w2 = dots.shape[0] // 2, dots.shape[1] // 2
    img = image.reshape(h2, 2, w2, 2, 3).astype(np.float32).mean(axis=(1, 3))
    d = dots.reshape(h2, 2, w2, 2).sum(axis=(1, 3))
    return (np.round(img).astype(np.uint8) if image.dtype == np.uint8 else img), d


def _resolve_root(root, name) -> Path:
    if root is None:
        raise ValueError(f"root must be the folder holding the {name!r} files")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if name in ("vgg_cells", "mbm") and (root / name).is_dir():
        root = root / name
    return root


def _pairs_vgg(root: Path):
    pairs = []
    for p in sorted(root.glob("*cell.png")):
        d = p.with_name(p.name[: -len("cell.png")] + "dots.png")
        pairs.append((p, d))
    return pairs


_MBM = re.compile(r"^(?P<base>.+)_(?P<idx>\d+)\.png$")


def _pairs_mbm(root: Path):
    pairs = []
    for p in sorted(root.glob("*.png")):
        m = _MBM.match(p.name)
        if not m or m.group("base").endswith("_dots"):
            continue
        pairs.append((p, root / f"{m.group('base')}_dots_{m.group('idx')}.png"))
    return pairs


_DOT_SUFFIXES = ("_dots", "-dots", ".dots", "dots")


def _pairs_folder(root: Path):
    """Generic folder: ``<stem>.<img>`` with ``<stem>{_dots,-dots,dots}.<img|csv|geojson>``
    or ``<stem>.<csv|geojson>``; any file whose stem ends in 'dots' is an annotation."""
    files = sorted(p for p in root.iterdir() if p.is_file())
    ann_ok = IMAGE_EXTS + POINT_EXTS
    by_stem = {}
    for p in files:
        if p.suffix.lower() in ann_ok:
            by_stem.setdefault(p.stem, []).append(p)
    pairs = []
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTS or p.stem.lower().endswith("dots"):
            continue
        cands = [q for s in _DOT_SUFFIXES for q in by_stem.get(p.stem + s, [])]
        cands += [q for q in by_stem.get(p.stem, []) if q.suffix.lower() in POINT_EXTS]
        if not cands and p.stem.endswith("cell"):
            cands = by_stem.get(p.stem[: -len("cell")] + "dots", [])
        if not cands:
            raise ValueError(f"no dot annotation found for image {p} (expected e.g. {p.stem}_dots.png or {p.stem}.csv)")
        pairs.append((p, cands[0]))
    return pairs


def load_dataset(name: str, root, *, halve: bool | None = None, red_threshold: float = DEFAULT_RED_THRESHOLD,
                 limit: int | None = None) -> DotDataset:
    """Load a dot-annotated dataset.

    Args:
        name: ``"vgg_cells"``, ``"mbm"`` or ``"folder"`` (generic image + dot files).
        root: the dataset folder (or its parent).
        halve: 2x2-pool images and sum-pool dots (the paper's MBM protocol,
            600 -> 300). Default: off; ``fastcount train`` turns it on for MBM.
        red_threshold: see ``read_dots``.
        limit: load only the first ``limit`` pairs (sorted order).
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    root = _resolve_root(root, name)
    pairs = {"vgg_cells": _pairs_vgg, "mbm": _pairs_mbm, "folder": _pairs_folder}[name](root)
    if not pairs:
        raise ValueError(f"no {name} images found in {root}")
    if limit is not None:
        pairs = pairs[:limit]
    images, dots, names = [], [], []
    for img_path, dot_path in pairs:
        if not dot_path.is_file():
            raise FileNotFoundError(f"dot annotation {dot_path} for image {img_path} not found")
        img = read_image(img_path)
        d = read_dots(dot_path, img.shape[:2], red_threshold=red_threshold)
        if halve:
            img, d = _halve(img, d)
        images.append(img)
        dots.append(d)
        names.append(img_path.name)
    return DotDataset(images, dots, names, name)
