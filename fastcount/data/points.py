"""Point annotations (CSV, QuPath GeoJSON) and annotated regions, as continuous coordinates.

The one coordinate rule: pixel (row r, col c) covers [c, c+1) x [r, r+1) in
continuous (x, y) coordinates, QuPath's convention. A point at (x, y) falls in
pixel (floor(y), floor(x)), so y = 255.5 in a 256-row image is row 255.
Whole-number coordinates land on the pixel of that number, as before.

- CSV: a header naming the columns, ``x,y`` (x = column) or ``row,col``
  (any case, extra columns allowed; a ``class`` column can be filtered on).
  A file without a header is read as ``row,col``.
- GeoJSON (QuPath export): Point and MultiPoint features, x = column,
  y = row; the class is ``properties.classification.name`` (or
  ``properties.classification`` as a string, or ``properties.name``).
  Polygon/MultiPolygon features are annotated regions (``read_regions``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

__all__ = ["read_points", "read_regions", "points_to_pixels", "feature_class"]

# Header names of the (row, column) coordinates; x is the column, y the row.
_COLUMNS = (("row", "col"), ("y", "x"), ("r", "c"))


def _classes(classes) -> set[str] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        return {classes}
    out = set(classes)
    if not out or not all(isinstance(c, str) for c in out):
        raise ValueError(f"classes must be a class name or a non-empty list of names, got {classes!r}")
    return out


def points_to_pixels(points: np.ndarray) -> np.ndarray:
    """(N, 2) continuous (row, col) coordinates -> (N, 2) int64 pixel indices (floor)."""
    return np.floor(np.asarray(points, dtype=np.float64)).astype(np.int64).reshape(-1, 2)


def read_points(path, classes=None) -> np.ndarray:
    """Points of a CSV or GeoJSON file as an (N, 2) float64 array of continuous (row, col).

    ``classes``: keep only points of this class name (or names); CSV files need
    a ``class`` column for that.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point annotation file not found: {path}")
    wanted = _classes(classes)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, wanted)
    feats = _features(path)
    rows = []
    for f in feats:
        geom = f.get("geometry", f) if isinstance(f, dict) else None
        if not isinstance(geom, dict) or geom.get("type") not in ("Point", "MultiPoint"):
            continue
        if wanted is not None and feature_class(f) not in wanted:
            continue
        coords = [geom["coordinates"]] if geom["type"] == "Point" else geom["coordinates"]
        try:
            rows.extend((float(c[1]), float(c[0])) for c in coords)
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: bad point coordinates {geom['coordinates']!r}") from e
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def feature_class(feature) -> str | None:
    """The class name of a GeoJSON feature as QuPath writes it (None when unclassified)."""
    props = (feature.get("properties") or {}) if isinstance(feature, dict) else {}
    c = props.get("classification")
    if isinstance(c, dict):
        return c.get("name")
    if isinstance(c, str):
        return c
    return props.get("name") if isinstance(props.get("name"), str) else None


def read_regions(path, classes=None) -> list[np.ndarray]:
    """Annotated regions of a GeoJSON file: one (K, 2) float64 array of (x, y) vertices per polygon.

    QuPath rectangles are Polygons; a MultiPolygon gives one region per part.
    Holes are ignored (the outer ring is the region).
    """
    wanted = _classes(classes)
    out = []
    for f in _features(Path(path)):
        geom = f.get("geometry", f) if isinstance(f, dict) else None
        if not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        if wanted is not None and feature_class(f) not in wanted:
            continue
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for rings in polys:
            ring = np.array([(float(p[0]), float(p[1])) for p in rings[0]], dtype=np.float64)
            if len(ring) < 3:
                raise ValueError(f"{path}: a region polygon needs at least 3 vertices, got {len(ring)}")
            out.append(ring)
    return out


def _features(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"GeoJSON file not found: {path}")
    try:
        gj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid GeoJSON: {e}") from e
    if isinstance(gj, dict):
        return gj.get("features", [gj])
    if isinstance(gj, list):  # QuPath may export a bare list of features
        return gj
    raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of features")


def _read_csv(path: Path, wanted) -> np.ndarray:
    with open(path, newline="") as f:
        recs = [(i, r) for i, r in enumerate(csv.reader(f)) if r and "".join(r).strip()]
    if not recs:
        return np.zeros((0, 2), dtype=np.float64)
    head = [h.strip().lower() for h in recs[0][1]]
    order, cls_col = None, None
    for row_name, col_name in _COLUMNS:
        if row_name in head and col_name in head:
            order = (head.index(row_name), head.index(col_name))
            break
    if order is not None:
        body = recs[1:]
        cls_col = head.index("class") if "class" in head else None
    else:
        try:
            float(recs[0][1][0])
        except (ValueError, IndexError):
            raise ValueError(f"{path}: the header {recs[0][1]!r} names no coordinate columns; "
                             "expected 'x,y' (x = column) or 'row,col'") from None
        body, order = recs, (0, 1)  # no header: row,col
    if wanted is not None and cls_col is None:
        raise ValueError(f"{path}: classes={sorted(wanted)} given but the CSV has no 'class' column")
    rows = []
    for i, rec in body:
        try:
            if cls_col is not None and wanted is not None and rec[cls_col].strip() not in wanted:
                continue
            rows.append((float(rec[order[0]]), float(rec[order[1]])))
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{i + 1}: expected numbers in the coordinate columns, got {rec!r}") from None
    return np.array(rows, dtype=np.float64).reshape(-1, 2)
