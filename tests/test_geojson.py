"""``SlideCount.to_geojson``: a FeatureCollection QuPath imports (closed, valid polygons with
``objectType`` and a ``Count`` measurement), in level-0 pixels when counted at a coarser level,
with the counts where the cells are."""
import json
import math

import numpy as np
import pytest
import shapely
from shapely.geometry import Point, shape

import fastcount
from fastcount.data.synth import write_synthetic_slide

pytestmark = pytest.mark.usefixtures("one_thread")

# Level 0 is 515 x 300, level 1 258 x 150: the two axes have different downsamples (515/258 and 2).
SIZE = (515, 300)


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """A synthetic two-level slide with known cells, counted at level 1 by the default weights."""
    path = tmp_path_factory.mktemp("geojson") / "slide.tif"
    info = write_synthetic_slide(path, SIZE, seed=3, tile=128, tissue_fraction=0.35, n_regions=2, min_level_side=260)
    assert info["levels"] == [(515, 300), (258, 150)]
    res = fastcount.count_slide(path, fastcount.load_model(), level=1, tile=128, mask=None, progress=False)
    return res, info


def polygons(gj):
    return [shape(f["geometry"]) for f in gj["features"]]


def test_feature_collection_in_qupath_form(counted, tmp_path):
    res, _ = counted
    gj = res.to_geojson(tmp_path / "d.geojson")
    assert json.loads((tmp_path / "d.geojson").read_text()) == gj  # the file holds the same, as strict JSON
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) > 10
    for f in gj["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        (ring,) = f["geometry"]["coordinates"]  # an outer ring, no holes
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed square
        props = f["properties"]
        # QuPath's reader knows annotation / detection / tile / cell / tma_core; a density block is a tile.
        assert props["objectType"] == "tile"
        assert set(props["measurements"]) == {"Count"}  # QuPath 0.4+ measurement map
        assert math.isfinite(props["measurements"]["Count"]) and props["measurements"]["Count"] > 0
        assert props["classification"]["name"] and len(props["classification"]["color"]) == 3
    shapes = polygons(gj)
    assert all(p.is_valid and p.area > 0 for p in shapes)
    # Blocks tile the image: no two overlap, and the counts they carry are the density's.
    assert shapely.union_all(shapes).area == pytest.approx(sum(p.area for p in shapes))
    counts = [f["properties"]["measurements"]["Count"] for f in gj["features"]]
    assert sum(counts) == pytest.approx(res.density[res.density > 0].sum(), rel=1e-12)


def test_level1_count_is_placed_in_level0_pixels(counted):
    res, info = counted
    assert res.level == 1 and res.shape == (258, 150)
    H0, W0 = info["shape"]
    # Every block, whatever its count: together they cover exactly the level-0 image.
    shapes = polygons(res.to_geojson(min_count=-math.inf))
    assert len(shapes) == res.density.size
    union = shapely.union_all(shapes)
    assert union.bounds == pytest.approx((0.0, 0.0, W0, H0), abs=1e-9)
    assert union.area == pytest.approx(H0 * W0, rel=1e-12)
    # A block's level-0 box is its counted-level box scaled by each axis's downsample.
    sy, sx = H0 / res.shape[0], W0 / res.shape[1]
    gj = res.to_geojson(min_count=-math.inf)
    for f, (i, j) in zip(gj["features"][:: 7], list(np.ndindex(res.density.shape))[:: 7]):
        y0, x0, y1, x1 = res.block_box(i, j)
        assert shape(f["geometry"]).bounds == pytest.approx((x0 * sx, y0 * sy, x1 * sx, y1 * sy))


def test_highest_count_polygon_covers_cells(counted):
    res, info = counted
    slide = info["slide"]
    ys, xs = np.nonzero(slide.dots())
    cells = [Point(x + 0.5, y + 0.5) for y, x in zip(ys, xs)]  # level-0 pixel centres
    assert len(cells) > 50
    gj = res.to_geojson()
    shapes = polygons(gj)
    counted_cells = np.array([sum(p.contains(c) for c in cells) for p in shapes])
    predicted = np.array([f["properties"]["measurements"]["Count"] for f in gj["features"]])
    top = int(predicted.argmax())
    cy, cx = shapes[top].centroid.y, shapes[top].centroid.x
    assert slide.in_tissue(np.array(cy), np.array(cx))
    assert counted_cells[top] >= 0.5 * counted_cells.max() > 0
    # Block by block, the counts follow the cells (a misplaced grid would not).
    assert np.corrcoef(predicted, counted_cells)[0, 1] > 0.8


def test_geojson_rejects_a_bad_min_count(counted):
    res, _ = counted
    for bad in ("1", None, float("nan")):
        with pytest.raises((TypeError, ValueError), match="min_count"):
            res.to_geojson(min_count=bad)


def test_empty_result_is_an_empty_collection(counted):
    res, _ = counted
    gj = res.to_geojson(min_count=math.inf)
    assert gj == {"type": "FeatureCollection", "features": []}

