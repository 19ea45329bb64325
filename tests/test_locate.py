"""locate(): points from count maps, tied to the count; points in count_image, SlideCount exports and the CLI."""
import csv
import json

import numpy as np
import scipy.ndimage
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from shapely.geometry import Point, shape

import fastcount
from conftest import SLIDES, gpu
from fastcount import Points, count_image, count_slide, locate, make_targets_from_points
from fastcount.cli import main
from fastcount.geometry import Geometry
from fastcount.io import save_model
from fastcount.localise import LocateParams, Locator, _largest_remainder
from fastcount.slide import SlideCount
from test_slide_exact import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def spread_dots(rng, h, w, n, gap):
    """``n`` dots at least ``gap`` px apart (rejection sampling)."""
    pts = []
    while len(pts) < n:
        p = rng.integers(0, (h, w))
        if all(np.abs(p - q).max() >= gap for q in pts):
            pts.append(p)
    return np.array(pts).reshape(-1, 2)


def matched_distances(pred, true):
    d = np.linalg.norm(pred[:, None] - true[None], axis=-1)
    r, c = linear_sum_assignment(d)
    return d[r, c]


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_dots_of_an_exact_box_map_are_found(stride):
    # A noiseless count map of separated objects: every object found within a cell (plus rounding of
    # the stride grid), none extra, in one block. Smaller blocks keep the count exact, but the inverse
    # filter smears an object's mass over a seam, so a block can take a neighbour's object.
    rng = np.random.default_rng(stride)
    dots = spread_dots(rng, 151, 137, 30, gap=14).astype(float)
    F = make_targets_from_points(dots.astype(int), (151, 137), 32, stride)
    tol = 0.75 * stride + 0.5
    pts = locate(F, patch_size=32, stride=stride)
    assert len(pts) == 30 and matched_distances(pts.coords, dots).max() <= tol
    assert (pts.scores > 0).all()
    pts = locate(F, patch_size=32, stride=stride, block=64)
    assert len(pts) == 30 and (matched_distances(pts.coords, dots) <= tol).mean() >= 0.8


def test_number_of_points_is_the_rounded_count_and_blocks_get_their_share():
    # Count consistency: exactly round(total) points; the blocks' counts partition the count map
    # (they add up to the count), and every block gets the floor or ceil of its scaled count.
    rng = np.random.default_rng(0)
    g = Geometry(32, 1)
    for trial in range(4):
        h, w = (int(v) for v in rng.integers(40, 200, 2))
        dots = np.stack([rng.integers(0, h, 80), rng.integers(0, w, 80)], 1)
        F = make_targets_from_points(dots, (h, w), 32, 1).double()
        F += torch.from_numpy(rng.normal(0, 0.3, F.shape))
        total = float(F.sum()) / g.redundancy
        pts = locate(F, block=48)
        assert len(pts) == round(total)
        loc = Locator(h, w, g, block=48)
        idx = list(range(loc.n_blocks))
        cands = loc.solve(idx, torch.stack([loc.crop_window(F, i) for i in idx]))
        counts = np.array([c.mass for c in cands])
        assert counts.sum() == pytest.approx(total, rel=1e-9)
        assert all(len(c.scores) for c in cands)  # every block has candidates here
        share = counts.clip(0) * round(total) / counts.clip(0).sum()
        # a point lies within half a cell of its maximum, whose cell is in the block
        bi = (np.floor(pts.coords[:, 0] + 0.5) // 48).astype(int)
        bj = (np.floor(pts.coords[:, 1] + 0.5) // 48).astype(int)
        per_block = np.bincount(bi * loc.grid[1] + bj, minlength=loc.n_blocks)
        assert (np.abs(per_block - share) < 1).all() and per_block.sum() == len(pts)
        # and the block counts follow the dots: within the objects straddling a seam (r/2 each side)
        true = np.bincount((dots[:, 0] // 48) * loc.grid[1] + dots[:, 1] // 48, minlength=loc.n_blocks)
        assert np.abs(per_block - true).sum() <= 0.5 * len(dots)


def test_largest_remainder_adds_up_and_rounds_each_share():
    rng = np.random.default_rng(1)
    for _ in range(50):
        m = rng.random(rng.integers(1, 30)) * rng.choice([0.1, 1, 10])
        n = int(rng.integers(0, 200))
        c = _largest_remainder(m, n)
        q = m * n / m.sum()
        assert c.sum() == n and (np.abs(c - q) < 1).all()
    assert _largest_remainder(np.array([0.5, 0.5]), 1).tolist() == [1, 0]  # ties: the first block
    assert _largest_remainder(np.zeros(3), 5).tolist() == [0, 0, 0]


def test_empty_negative_and_crowded_maps():
    assert len(locate(torch.zeros(40, 50))) == 0
    assert len(locate(-torch.ones(40, 50))) == 0  # a negative count places nothing
    F = make_targets_from_points(np.array([[5, 5]] * 3), (10, 10), 32, 1)  # three objects on one pixel
    pts = locate(F)
    assert len(pts) == 3 and np.abs(pts.coords - 5).max() <= 1.0
    pts = locate(F, total=2.4)
    assert len(pts) == 2


def test_locate_validates_its_input():
    with pytest.raises(TypeError, match="count_map"):
        locate([[1.0]])
    with pytest.raises(ValueError, match="count_map must be"):
        locate(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        locate(torch.full((40, 40), float("nan")))
    with pytest.raises(ValueError, match="not a count map"):
        locate(torch.zeros(20, 40))  # smaller than r + 1
    with pytest.raises(ValueError, match="block"):
        locate(torch.zeros(40, 40), block=0)
    with pytest.raises(ValueError, match="multiples of the stride 4"):
        locate(torch.zeros(40, 40), stride=4, block=30)
    with pytest.raises(ValueError, match="stride must divide"):
        locate(torch.zeros(40, 40), stride=5)


def test_count_image_points_are_locate_of_its_count_map():
    model = tiny_model(1, 0)
    img = np.random.default_rng(3).integers(0, 256, (61, 47, 3), dtype=np.uint8)
    n, pts = count_image(img, model, device="cpu", points=True)
    assert n == count_image(img, model, device="cpu")
    with torch.inference_mode():
        ref = locate(model(torch.from_numpy(img).permute(2, 0, 1)[None].float()), total=n)
    assert isinstance(pts, Points) and len(pts) == max(0, round(n))
    np.testing.assert_array_equal(pts.coords, ref.coords)


def test_guided_count_image_reads_the_models_params_and_uses_the_image(tmp_path):
    # Params stored in the weights travel with the model: count_image locates with the image guide, and
    # the guide moves points onto the image's blobs (here: dark discs the count map only roughly sees).
    model = tiny_model(1, 0)
    params = LocateParams(eps=1e-4, smooth=3.0, guide="dark", guide_sigma=3.0)
    path = save_model(model, tmp_path / "m.safetensors", metadata={"locate": params.to_json()})
    loaded = fastcount.load_model(path)
    assert LocateParams.of(loaded) == params and LocateParams.of(model) == LocateParams()
    img = np.random.default_rng(3).integers(0, 256, (61, 47, 3), dtype=np.uint8)
    n, pts = count_image(img, loaded, device="cpu", points=True)
    with torch.inference_mode():
        cm = loaded(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    ref = locate(cm, total=n, image=img, params=params)
    np.testing.assert_array_equal(pts.coords, ref.coords)
    assert len(pts) == max(0, round(n))
    # a noisy count map of 6 dark discs: the guide lands on the discs' centres
    rng = np.random.default_rng(0)
    dots = spread_dots(rng, 90, 90, 6, 25)
    yy, xx = np.mgrid[:90, :90]
    img = np.full((90, 90, 3), 220, np.uint8)
    for y, x in dots:
        img[(yy - y) ** 2 + (xx - x) ** 2 <= 16] = 40
    F = make_targets_from_points(dots, (90, 90), 32, 1).double()
    F = F + torch.from_numpy(np.random.default_rng(1).normal(0, 0.02, F.shape))
    F = torch.from_numpy(scipy.ndimage.uniform_filter(F.numpy(), 7))  # a blurred map
    plain, guided = locate(F, total=6), locate(F, total=6, image=img, params=LocateParams(smooth=2.0, guide="dark",
                                                                                         guide_sigma=2.5))
    assert len(guided) == len(plain) == 6
    assert matched_distances(guided.coords, dots).max() <= 1.0
    assert matched_distances(guided.coords, dots).mean() < matched_distances(plain.coords, dots).mean()


def test_locate_params_are_checked():
    with pytest.raises(ValueError, match="guide must be"):
        LocateParams(guide="grey")
    with pytest.raises(ValueError, match="eps"):
        LocateParams(eps=0)
    with pytest.raises(ValueError, match="smooth"):
        LocateParams(smooth=-1)
    with pytest.raises(ValueError, match="reaches further"):
        locate(torch.zeros(40, 40), image=np.zeros((8, 8, 3), np.uint8),
               params=LocateParams(guide="dark", guide_sigma=8.0))
    with pytest.raises(ValueError, match="pass image="):
        locate(torch.zeros(40, 40), params=LocateParams(guide="dark"))
    with pytest.raises(ValueError, match="image of 9x8"):
        locate(torch.zeros(40, 40), image=np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="params"):
        locate(torch.zeros(40, 40), params={"guide": "dark"})
    bad = tiny_model(1, 0).__class__()
    bad.metadata = {"locate": '{"guide": "grey"}'}
    with pytest.raises(ValueError, match="not valid LocateParams"):
        LocateParams.of(bad)


# --------------------------------------------------------------------------- SlideCount exports


def result_with_points(level0_scale=(1.0, 1.0)):
    res = SlideCount(total=3.0, density=np.ones((2, 2)), cell=32, stats={}, shape=(40, 50),
                     level0_shape=(40 * level0_scale[0], 50 * level0_scale[1]), downsample=level0_scale[0])
    res.set_points(Points(np.array([[0.0, 0.0], [10.0, 20.0], [39.0, 49.0]]), np.array([0.9, 1.0, 0.25])))
    return res


def test_points_are_level0_xy_in_the_pixel_area_convention():
    # counted-level pixel (row r, col c) covers [c, c+1) x [r, r+1): its centre is (c + 0.5, r + 0.5),
    # then each axis scales by its own level-0 ratio.
    res = result_with_points((2.0, 4.0))
    np.testing.assert_allclose(res.points, [[0.5 * 4, 0.5 * 2], [20.5 * 4, 10.5 * 2], [49.5 * 4, 39.5 * 2]])


def test_csv_and_geojson_read_back_with_real_parsers(tmp_path):
    res = result_with_points()
    res.to_csv(tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["x", "y", "score"] and len(rows) == 3
    np.testing.assert_allclose([[float(r["x"]), float(r["y"])] for r in rows], res.points, atol=1e-3)
    np.testing.assert_allclose([float(r["score"]) for r in rows], res.point_scores, atol=1e-4)

    gj = json.loads(json.dumps(res.to_geojson(tmp_path / "c.geojson", points=True)))
    assert gj == json.loads((tmp_path / "c.geojson").read_text())
    feats = gj["features"]
    assert len(feats) == 3
    for f, (x, y), s in zip(feats, res.points, res.point_scores):
        geom = shape(f["geometry"])
        assert isinstance(geom, Point) and geom.equals(Point(x, y))
        assert f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] == "Cell"
        assert f["properties"]["measurements"]["Score"] == pytest.approx(s)
    assert all(f["properties"]["objectType"] == "tile" for f in res.to_geojson()["features"])  # default unchanged


def test_heatmap_marks_points_and_exports_without_points_are_clear_errors(tmp_path):
    res = result_with_points()
    res.save_heatmap(tmp_path / "a.png")
    res.save_heatmap(tmp_path / "b.png", points=True)
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB")).astype(int)
    changed = np.argwhere((a != b).any(-1))
    assert len(changed) > 0
    # every changed pixel lies within the ring radius (2 px, +1 for the outline) of a point
    d = np.abs(changed[:, None, ::-1] - res.points[None]).max(-1).min(1)
    assert (d <= 3).all()
    bare = SlideCount(total=1.0, density=np.ones((1, 1)), cell=32, stats={}, shape=(10, 10))
    for call in (lambda: bare.to_csv(tmp_path / "x.csv"), lambda: bare.to_geojson(points=True),
                 lambda: bare.save_heatmap(tmp_path / "x.png", points=True)):
        with pytest.raises(ValueError, match="points=True"):
            call()
    assert not (tmp_path / "x.csv").exists()


def test_points_with_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="points=True cannot be combined with checkpoint"):
        count_slide(np.zeros((20, 20, 3), np.uint8), tiny_model(1, 0), points=True, checkpoint=tmp_path / "c",
                    progress=False)


def test_cli_points_csv_and_detections(tmp_path, capsys):
    model = tiny_model(1, 0)
    weights = save_model(model, tmp_path / "w.safetensors")
    args = ["count", SLIDES / "boxes.tiff", "--weights", weights, "--level", 1, "--tile", 64, "--backend",
            "eager", "--quiet", "--mask", "none", "--points", tmp_path / "p.csv", "--geojson", tmp_path / "c.geojson"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    ref = count_slide(SLIDES / "boxes.tiff", model, level=1, tile=64, backend="eager", mask=None, progress=False,
                      points=True)
    assert ref.level0_scale() != (1.0, 1.0)
    rows = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1, ndmin=2)
    assert len(rows) == len(ref.points) == max(0, round(ref.total))
    np.testing.assert_allclose(rows[:, :2], ref.points, atol=2e-3)
    feats = json.loads((tmp_path / "c.geojson").read_text())["features"]
    assert len(feats) == len(rows) and {f["properties"]["objectType"] for f in feats} <= {"detection"}


@gpu
def test_locate_on_cuda_matches_the_cpu():
    rng = np.random.default_rng(5)
    dots = np.stack([rng.integers(0, 90, 60), rng.integers(0, 70, 60)], 1)
    F = make_targets_from_points(dots, (90, 70), 32, 1).double() + torch.from_numpy(rng.normal(0, 0.2, (122, 102)))
    cpu, cuda = locate(F, block=48), locate(F.cuda(), block=48)
    assert len(cpu) == len(cuda)
    np.testing.assert_allclose(cuda.coords, cpu.coords, atol=1e-6)


def test_packaged_models_carry_their_locate_params():
    # README: the VGG model locates from the count map alone, the MBM model with the image as a guide.
    assert LocateParams.of(fastcount.load_model("vgg")) == LocateParams()
    mbm = LocateParams.of(fastcount.load_model("mbm"))
    assert mbm.guide == "dark" and mbm.smooth > 0
