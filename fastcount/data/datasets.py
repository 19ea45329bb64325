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
- point lists: CSV with a header naming its columns (``x,y`` with x = column,
  or ``row,col``; no header: ``row,col``) or QuPath GeoJSON Point/MultiPoint
  features (x = col, y = row), optionally filtered by class. Coordinates are
  continuous, pixel (x, y) covering [x, x+1) x [y, y+1) (``fastcount.data.points``).

Layouts of a ``folder`` dataset: files side by side (``NAME.png`` with
``NAME_dots.png``, ``NAME.csv``, ...), or sibling folders ``images/`` and
``annotations/`` (or ``dots/``, ``labels/``) holding files with the same stems.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..pixels import read_image_file
from .points import points_to_pixels, read_points

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


def read_dots(path, shape=None, red_threshold: float = DEFAULT_RED_THRESHOLD, classes=None) -> np.ndarray:
    """A dot annotation file as an HxW int64 count map.

    Args:
        path: dot image (PNG/TIFF/BMP exact, JPEG lossy) or point list (CSV/GeoJSON).
        shape: (H, W) of the image; required for point lists, checked for dot images.
        red_threshold: minimum R - max(G, B) (0..255) for a red dot pixel; for
            grayscale JPEG dot images, the minimum value. Exact PNG/TIFF dots
            (255, 0, 0) or non-zero 1-bit pixels pass any threshold.
        classes: point lists only: keep points of this class name (or names).
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
        pts = read_points(path, classes)
        pix = points_to_pixels(pts)
        dots = np.zeros(shape, dtype=np.int64)
        if len(pix):
            r, c = pix[:, 0], pix[:, 1]
            bad = (r < 0) | (r >= shape[0]) | (c < 0) | (c >= shape[1])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{path}: point {i} at (x {pts[i, 1]}, y {pts[i, 0]}) lies outside the image "
                                 f"{tuple(shape)} (pixel (x, y) covers [x, x+1) x [y, y+1))")
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
# Sibling-folder layout: root/images/NAME.ext beside root/<one of these>/NAME.ext
IMAGE_DIRS = ("images",)
ANNOTATION_DIRS = ("annotations", "dots", "labels")


def _by_stem(files) -> dict:
    by_stem = {}
    for p in files:
        if p.suffix.lower() in IMAGE_EXTS + POINT_EXTS:
            by_stem.setdefault(p.stem, []).append(p)
    return by_stem


def _annotation_for(img: Path, by_stem: dict, same_folder: bool) -> Path | None:
    """The annotation of ``img``: ``<stem>{_dots,-dots,dots}.*`` or ``<stem>.<csv|geojson>``;
    in an annotation folder also a plain ``<stem>.<image ext>``."""
    cands = [q for s in _DOT_SUFFIXES for q in by_stem.get(img.stem + s, [])]
    cands += [q for q in by_stem.get(img.stem, []) if q != img and (not same_folder or q.suffix.lower() in POINT_EXTS)]
    if not cands and img.stem.endswith("cell"):
        cands = by_stem.get(img.stem[: -len("cell")] + "dots", [])
    return cands[0] if cands else None


def _folder_layout(root: Path) -> tuple[Path, Path | None]:
    """(image folder, annotation folder or None for side-by-side files)."""
    img_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    ann_dir = next((root / d for d in ANNOTATION_DIRS if (root / d).is_dir()), None)
    if img_dir is not None and ann_dir is not None:
        return img_dir, ann_dir
    return root, None


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return f"{folder}: " + (", ".join(names[:limit]) + more if names else "(empty)")


def _pairs_folder(root: Path):
    """Generic folder (see the module docstring for the layouts); any image whose stem ends
    in 'dots' is an annotation, not an image."""
    img_dir, ann_dir = _folder_layout(root)
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if ann_dir is None:
        images = [p for p in images if not p.stem.lower().endswith("dots")]
        by_stem = _by_stem(p for p in root.iterdir() if p.is_file())
    else:
        by_stem = _by_stem(p for p in ann_dir.iterdir() if p.is_file())
    pairs, unmatched = [], []
    for p in images:
        ann = _annotation_for(p, by_stem, same_folder=ann_dir is None)
        (pairs.append((p, ann)) if ann is not None else unmatched.append(p.name))
    if unmatched or not images:
        where = [_listing(img_dir)] + ([_listing(ann_dir)] if ann_dir is not None else [])
        what = (f"no dot annotation found for {len(unmatched)} of {len(images)} images "
                f"({', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''})" if images
                else "no images found")
        raise ValueError(
            f"{what}. Expected NAME.png with NAME_dots.png, NAME.csv or NAME.geojson beside it, or folders "
            f"images/ and annotations/ (or dots/, labels/) with matching names. Found: " + "; ".join(where))
    return pairs


def load_dataset(name: str, root, *, halve: bool | None = None, red_threshold: float = DEFAULT_RED_THRESHOLD,
                 limit: int | None = None, classes=None) -> DotDataset:
    """Load a dot-annotated dataset.

    Args:
        name: ``"vgg_cells"``, ``"mbm"`` or ``"folder"`` (generic image + dot files).
        root: the dataset folder (or its parent).
        halve: 2x2-pool images and sum-pool dots (the paper's MBM protocol,
            600 -> 300). Default: off; ``fastcount train`` turns it on for MBM.
        red_threshold: see ``read_dots``.
        limit: load only the first ``limit`` pairs (sorted order).
        classes: point-list annotations: keep only points of this class (or classes).
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
        d = read_dots(dot_path, img.shape[:2], red_threshold=red_threshold, classes=classes)
        if halve:
            img, d = _halve(img, d)
        images.append(img)
        dots.append(d)
        names.append(img_path.name)
    return DotDataset(images, dots, names, name)
