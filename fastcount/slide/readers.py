"""Slide readers behind one small interface.

Every reader exposes ``level_count``, ``level_shapes`` ((H, W) per level),
``downsamples``, ``mpp`` (microns per pixel at level 0, or None) and
``read_region(level, y, x, h, w) -> (h, w, 3)`` array, opens lazily and never
decodes a whole level (plain PNG/JPEG images are the exception: they have no
tiles, so PIL decodes them once).

Pixels follow the one rule of ``fastcount.pixels`` (grayscale repeated to RGB,
alpha dropped, uint16 / 257 as float32, other integers and floats must lie in
0..255); OpenSlide's premultiplied-alpha RGBA is composited on white where
alpha < 255, as OpenSlide recommends.
"""
from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path

import numpy as np

from ..pixels import intensity_dtype, read_image_file, to_intensities

__all__ = ["SlideReader", "ArrayReader", "TiffReader", "OpenSlideReader", "ImageReader", "open_reader",
           "SlideReadError", "OPENSLIDE_EXTS"]

OPENSLIDE_EXTS = (".svs", ".ndpi", ".mrxs", ".dcm", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".tif", ".tiff")
PIL_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class SlideReadError(ValueError):
    """A slide could not be opened or a region of it could not be decoded."""


class SlideReader:
    """Interface; subclasses set ``level_shapes``, ``mpp``, ``name`` and implement ``_read``."""

    name: str = "array"
    level_shapes: list[tuple[int, int]]
    mpp: float | None = None

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    @property
    def downsamples(self) -> list[float]:
        h0, w0 = self.level_shapes[0]
        return [0.5 * (h0 / h + w0 / w) for h, w in self.level_shapes]

    @property
    def dtype(self):
        """The dtype ``read_region`` returns: uint8, or float32 for 16-bit and float sources."""
        return np.uint8

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y, y+h) x [x, x+w)`` of ``level`` as (h, w, 3); the box must lie inside the level."""
        H, W = self.level_shapes[level]
        if not (0 <= y and 0 <= x and h > 0 and w > 0 and y + h <= H and x + w <= W):
            raise ValueError(f"region y={y} x={x} h={h} w={w} lies outside level {level} of {self.name} ({H}x{W})")
        try:
            a = self._read(level, y, x, h, w)
        except (SlideReadError, TypeError, ValueError) as e:
            if isinstance(e, SlideReadError):
                raise
            raise SlideReadError(f"cannot read region (y={y}, x={x}, h={h}, w={w}) of level {level} of {self.name}: {e}") from e
        except Exception as e:  # decoder errors come in library-specific types
            raise SlideReadError(f"cannot read region (y={y}, x={x}, h={h}, w={w}) of level {level} of {self.name}: "
                                 f"{type(e).__name__}: {e}") from e
        a = to_intensities(a, self.name)
        if a.shape[:2] != (h, w):
            raise SlideReadError(f"{self.name}: reader returned {a.shape[:2]} for a {h}x{w} region")
        return a

    def _read(self, level, y, x, h, w):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, levels={self.level_shapes})"


class ArrayReader(SlideReader):
    """numpy, zarr or dask arrays (HxW or HxWxC): one level, sliced lazily."""

    def __init__(self, array, name: str = "source"):
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"{name} must be a path, numpy, zarr or dask array, got {type(array).__name__}")
        if len(shape) not in (2, 3):
            raise ValueError(f"{name} must be HxW or HxWxC, got shape {tuple(shape)}")
        if len(shape) == 3 and shape[2] not in (1, 3, 4):
            raise ValueError(f"{name} must have 1, 3 or 4 channels, got shape {tuple(shape)}")
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"{name} is empty: shape {tuple(shape)}")
        self._dtype = intensity_dtype(dtype, name)
        self.array = array
        self.name = name
        self.level_shapes = [(int(shape[0]), int(shape[1]))]

    @property
    def dtype(self):
        return self._dtype

    def _read(self, level, y, x, h, w):
        a = self.array[y : y + h, x : x + w]
        if hasattr(a, "compute"):  # dask
            a = a.compute()
        return np.asarray(a)


class TiffReader(SlideReader):
    """Tiled / pyramidal TIFF (incl. OME-TIFF, SubIFD pyramids, SVS) through tifffile + zarr."""

    def __init__(self, path):
        try:
            import tifffile
            import zarr  # noqa: F401  (lazy region reads go through tifffile's zarr store)
        except ImportError as e:
            raise SlideReadError(f"reading {path} with tifffile needs tifffile and zarr: "
                                 f"pip install 'fastcount[slides]' ({e})") from e
        self.path = Path(path)
        self.name = str(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = [lv for lv in series.levels]
            axes = series.axes
        except Exception as e:
            raise SlideReadError(f"tifffile cannot open {path}: {type(e).__name__}: {e}") from e
        if not (axes.endswith("YXS") or axes.endswith("YX")) or any(len(lv.shape) != len(axes) for lv in levels):
            raise SlideReadError(f"{path}: unsupported TIFF layout {axes!r} (expected a 2-D RGB or grayscale image)")
        lead = len(axes) - (3 if axes.endswith("YXS") else 2)
        self._lead = (0,) * lead  # first plane of any extra leading axes (T/C/Z)
        try:
            self._dtype = intensity_dtype(series.dtype, self.name)
        except TypeError as e:
            raise SlideReadError(str(e)) from e
        ydim = lead
        self.level_shapes = [(int(lv.shape[ydim]), int(lv.shape[ydim + 1])) for lv in levels]
        _check_tiles_present(self._tif, levels, self.level_shapes, path)
        self._zarr = {}
        self._lock = threading.Lock()
        self.mpp = _tiff_mpp(self._tif)
        # Decode one pixel now, so unsupported compressions fail at open, not mid-run.
        try:
            self._level(0)[self._lead + (slice(0, 1), slice(0, 1))]
        except Exception as e:
            self.close()
            raise SlideReadError(f"tifffile cannot decode {path}: {type(e).__name__}: {e}") from e

    def _level(self, level):
        z = self._zarr.get(level)
        if z is None:
            with self._lock:
                z = self._zarr.get(level)
                if z is None:
                    import zarr

                    z = zarr.open(self._tif.aszarr(series=0, level=level), mode="r")
                    self._zarr[level] = z
        return z

    @property
    def dtype(self):
        return self._dtype

    def _read(self, level, y, x, h, w):
        return np.asarray(self._level(level)[self._lead + (slice(y, y + h), slice(x, x + w))])

    def close(self):
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()


def _check_tiles_present(tif, levels, shapes, path):
    """Refuse a TIFF whose size fields claim more tiles/strips than it stores.

    tifffile reads a missing tile as zeros, so a damaged width or height (a few
    bytes in the header) would otherwise turn a small file into a gigapixel image
    of zeros to count, or exhaust memory just planning its tiles.
    """
    for lv, (h, w) in zip(levels, shapes):
        for page in lv.pages:
            if page is None:
                continue
            try:
                need, have = math.prod(page.keyframe.chunked), len(page.dataoffsets)
            except Exception as e:  # e.g. a zero tile side
                tif.close()
                raise SlideReadError(f"tifffile cannot open {path}: {type(e).__name__}: {e}") from e
            if have < need:
                tif.close()
                raise _DamagedTiff(f"{path}: damaged TIFF: a {h}x{w} level needs {need} tiles/strips, "
                                   f"the file lists {have}")


class _DamagedTiff(SlideReadError):
    """The file's own fields contradict each other: no other reader should guess at it."""


def _tiff_mpp(tif) -> float | None:
    """Microns per pixel from OME, Aperio or resolution tags, when the file says."""
    try:
        if tif.is_ome and tif.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            if m:
                u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
                v = float(m.group(1))
                unit = u.group(1) if u else "µm"
                return v * {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit, 1.0)
        page = tif.pages[0]
        desc = page.description or ""
        if "MPP = " in desc:  # Aperio
            return float(desc.split("MPP = ")[1].split("|")[0].strip())
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            if num and den and unit in (2, 3):  # inch, centimetre
                return (25400.0 if unit == 2 else 10000.0) * den / num
    except Exception:  # metadata is optional; a missing mpp only disables level-by-mpp
        return None
    return None


MAX_OPENSLIDE_TILE_PIXELS = 1 << 26  # 8192 x 8192; slide tiles are 256..4096 px a side


def _check_tile_size(slide, props, n_levels, path):
    """Refuse tile sizes OpenSlide could not allocate: it aborts the process (GLib
    g_malloc) on a damaged tile-size field instead of raising."""
    for i in range(n_levels):
        try:
            th = int(props.get(f"openslide.level[{i}].tile-height", 0))
            tw = int(props.get(f"openslide.level[{i}].tile-width", 0))
        except ValueError:
            continue  # not recorded: nothing to check
        if th * tw > MAX_OPENSLIDE_TILE_PIXELS:
            slide.close()
            raise SlideReadError(f"{path}: damaged slide: level {i} claims {th}x{tw} px tiles "
                                 f"(more than {MAX_OPENSLIDE_TILE_PIXELS} px)")


class OpenSlideReader(SlideReader):
    """Anything OpenSlide opens: SVS, NDPI, MRXS, DICOM WSI, generic tiled TIFF, ...

    OpenSlide takes a region's corner in level-0 pixels; at a level whose
    downsample is not a whole number that corner falls between level pixels
    and OpenSlide returns interpolated ones, so only levels with whole-number
    downsamples read their stored pixels here.
    """

    def __init__(self, path):
        try:
            import openslide
        except ImportError as e:
            raise SlideReadError(f"reading {path} needs openslide: pip install 'fastcount[slides]'") from e
        self.path = Path(path)
        self.name = str(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as e:
            raise SlideReadError(f"OpenSlide cannot open {path}: {type(e).__name__}: {e}") from e
        self.level_shapes = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        self._downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        _check_tile_size(self._slide, props, len(self.level_shapes), path)
        try:
            mx, my = float(props.get("openslide.mpp-x", "nan")), float(props.get("openslide.mpp-y", "nan"))
            self.mpp = 0.5 * (mx + my) if np.isfinite(mx) and np.isfinite(my) else None
        except ValueError:
            self.mpp = None

    @property
    def downsamples(self):
        return list(self._downsamples)

    def _read(self, level, y, x, h, w):
        ds = self._downsamples[level]
        # OpenSlide takes the top-left corner in level-0 coordinates.
        im = self._slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        a = np.asarray(im)
        rgb, alpha = a[:, :, :3], a[:, :, 3:4]
        if alpha.min() < 255:  # premultiplied; transparent (no data) becomes white background
            rgb = (rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))).clip(0, 255).astype(np.uint8)
        return rgb

    def close(self):
        s = getattr(self, "_slide", None)
        if s is not None:
            s.close()


class ImageReader(SlideReader):
    """PNG / JPEG / BMP and other PIL images: decoded once (they have no tiles)."""

    def __init__(self, path):
        self.path = Path(path)
        self.name = str(path)
        try:
            self._a = read_image_file(self.path)
        except (ValueError, TypeError) as e:
            raise SlideReadError(str(e)) from e
        self.level_shapes = [self._a.shape[:2]]

    @property
    def dtype(self):
        return self._a.dtype.type

    def _read(self, level, y, x, h, w):
        return self._a[y : y + h, x : x + w]


def _has_suffix(path: Path, exts) -> bool:
    n = path.name.lower()
    return any(n.endswith(e) for e in exts)


def _open_zarr(path: Path, name: str) -> ArrayReader:
    """The zarr array stored in folder ``path`` (a group is refused, naming what it holds)."""
    try:
        import zarr
    except ImportError as e:
        raise SlideReadError(f"reading {path} needs zarr: pip install 'fastcount[slides]'") from e
    try:
        z = zarr.open(str(path), mode="r")
    except Exception as e:
        raise SlideReadError(f"{name}: cannot open {path} as a zarr array: {type(e).__name__}: {e}") from e
    if not hasattr(z, "shape"):
        members = sorted(z.keys()) if hasattr(z, "keys") else []
        raise SlideReadError(f"{name}: {path} is a zarr group holding {members}, expected a zarr array; "
                             "pass the folder of one array")
    return ArrayReader(z, name=str(path))


def open_reader(source, name: str = "source") -> SlideReader:
    """A reader for ``source``: a path (slide or image file), or a numpy/zarr/dask array.

    Paths are tried in order of fit: PIL images by extension; a ``.zarr``
    folder as one zarr array; TIFF, SVS and NDPI files through tifffile first
    (OME, SubIFD, Aperio and Hamamatsu pyramids), then OpenSlide; other slide
    formats through OpenSlide, then tifffile. The error names the file and
    every reader's complaint.
    """
    if isinstance(source, SlideReader):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{name}: slide/image file not found: {path}")
        if path.is_dir() and not _has_suffix(path, (".zarr",)):
            raise SlideReadError(f"{name}: {path} is a directory, expected a slide or image file")
        if _has_suffix(path, (".zarr",)):
            return _open_zarr(path, name)
        if _has_suffix(path, PIL_EXTS):
            order = [ImageReader]
        elif _has_suffix(path, (".tif", ".tiff", ".btf", ".tf8", ".qptiff", ".svs", ".ndpi")):
            # tifffile returns each level's stored pixels; OpenSlide interpolates a level whose
            # downsample is not a whole number (level-0 corners fall between its pixels).
            order = [TiffReader, OpenSlideReader]
        elif _has_suffix(path, OPENSLIDE_EXTS):
            order = [OpenSlideReader, TiffReader]
        else:
            order = [OpenSlideReader, TiffReader, ImageReader]
        errors = []
        for cls in order:
            try:
                reader = cls(path)
            except SlideReadError as e:
                errors.append(str(e))
                if isinstance(e, _DamagedTiff):
                    break  # OpenSlide would show the missing tiles as blank and count them for hours
                continue
            if reader.level_shapes[0][0] < 1 or reader.level_shapes[0][1] < 1:
                reader.close()
                raise SlideReadError(f"{name}: {path} is empty (shape {reader.level_shapes[0]})")
            return reader
        raise SlideReadError(f"{name}: cannot open {path} as a slide or image: " + "; ".join(errors))
    if isinstance(source, np.ndarray) or (hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__")):
        if type(source).__module__.startswith("torch"):
            raise TypeError(f"{name}: pass a torch tensor as a numpy HxWxC array (tensor.permute(1, 2, 0).numpy())")
        return ArrayReader(source, name=name)
    raise TypeError(f"{name} must be a path, a numpy array, a zarr array or a dask array, got {type(source).__name__}")
