"""Points across tiles: count_slide(points=True) gives the whole-image points (any tile, batch, stride, mask)."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcount import count_slide, locate, make_targets_from_points
from fastcount.geometry import Geometry
from fastcount.localise import LocateParams, Locator, guide_cells, guide_span
from fastcount.slide import plan_tiles
from fastcount.slide.points import SlidePoints
from test_slide_exact import accepted_tiles, kept_count_map, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def sorted_rows(a):
    a = np.asarray(a).reshape(-1, 2)
    return a[np.lexsort((a[:, 1], a[:, 0]))]


def same_points(a, b, tol):
    """Same number of points, and each point of ``a`` has its partner in ``b`` within ``tol`` px
    (matched greedily; points closer than 1 px to each other are not expected)."""
    a, b = sorted_rows(a), sorted_rows(b)
    assert len(a) == len(b), (len(a), len(b))
    if len(a):
        d = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
        assert (d.min(1) <= tol).all() and (d.min(0) <= tol).all(), float(d.min(1).max())


def keep_mask(shape, tile, g, mask):
    """Which tiles of the plan the engine keeps, for feeding SlidePoints by hand."""
    return [t for t in plan_tiles(*shape, tile, g).tiles if mask is None or mask[t.iy0 : t.iy1, t.ix0 : t.ix1].any()]


@st.composite
def fed_cases(draw):
    stride = draw(st.sampled_from([1, 2, 4, 8]))
    h, w = draw(st.integers(1, 150)), draw(st.integers(1, 150))
    block = draw(st.integers(max(1, 8 // stride), max(1, 64 // stride))) * stride  # a multiple of the stride
    halo = draw(st.integers(0, 4)) * stride
    tile = draw(accepted_tiles(stride, most=96))
    masked = draw(st.booleans())
    return dict(stride=stride, h=h, w=w, block=block, halo=halo, tile=tile, masked=masked,
                seed=draw(st.integers(0, 10**6)), order=draw(st.sampled_from(["raster", "reversed", "shuffled"])))


def noisy_case(rng, c, g):
    """A noisy box-sum count map of random dots, a random mask (if the case asks), the kept tiles,
    the map with the skipped tiles zeroed and its count."""
    h, w = c["h"], c["w"]
    n = int(rng.integers(0, 1 + h * w // 100))
    dots = np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], 1)
    F = make_targets_from_points(dots, (h, w), 32, c["stride"]).double()
    F += torch.from_numpy(rng.normal(0, 0.05, F.shape))  # model-like noise, some of it negative
    F = F.float().double()  # backends' count maps are float32 (the consumer keeps them so)
    mask = (rng.random((h, w)) < 0.02) if c["masked"] else None
    kept = keep_mask((h, w), c["tile"], g, mask)
    Fk = F * kept_count_map(SimpleNamespace(geometry=g), (h, w), c["tile"], mask)
    return F, mask, kept, Fk, float(Fk.sum()) / g.redundancy


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=fed_cases())
def test_tiles_in_any_order_give_the_whole_map_points(c):
    # The consumer fed the tiles of one count map (any plan, order, mask) finds exactly the points of
    # locate() on that map with the skipped tiles zeroed: window assembly, ownership, seams, masks.
    rng = np.random.default_rng(c["seed"])
    g = Geometry(32, c["stride"])
    h, w = c["h"], c["w"]
    F, mask, kept, Fk, total = noisy_case(rng, c, g)
    opts = dict(block=c["block"], halo=c["halo"], iterations=8)
    ref = locate(Fk, patch_size=32, stride=c["stride"], total=total, **opts)

    order = list(kept)
    if c["order"] == "reversed":
        order.reverse()
    elif c["order"] == "shuffled":
        rng.shuffle(order)
    sp = SlidePoints((h, w), g, kept, **opts)
    for t in order:
        hh, ww = t.cy1 - t.cy0, t.cx1 - t.cx0
        sp(t, F[t.gy0 : t.gy0 + hh, t.gx0 : t.gx0 + ww].clone())
    got = sp.finish(total)
    assert len(got) == len(ref) == max(0, round(total))
    same_points(got.coords, ref.coords, 1e-9)
    np.testing.assert_allclose(np.sort(got.scores), np.sort(ref.scores), rtol=0, atol=1e-9)


@st.composite
def slide_cases(draw):
    stride = draw(st.sampled_from([1, 2, 4, 8]))
    kind = draw(st.sampled_from(["none", "none", "blocks"]))
    h, w = draw(st.integers(1, 170)), draw(st.integers(1, 170))
    mask = None
    if kind == "blocks":
        b = draw(st.integers(8, 48))
        low = np.random.default_rng(h * 7 + w).random((-(-h // b), -(-w // b))) < 0.5
        mask = np.kron(low, np.ones((b, b), bool))[:h, :w]
    return dict(h=h, w=w, stride=stride, tile=draw(accepted_tiles(stride, most=120)), mask=mask,
                batch=draw(st.sampled_from([1, 3])), seed=draw(st.integers(0, 3)))


def check_slide_case(c):
    model = tiny_model(c["stride"], c["seed"])
    img = np.random.default_rng(c["h"] * 1000 + c["w"]).integers(0, 256, (c["h"], c["w"], 3), dtype=np.uint8)
    with torch.inference_mode():
        cm = model(torch.from_numpy(img).permute(2, 0, 1)[None].float())[0, 0].double()
    cmk = cm * kept_count_map(model, img.shape[:2], c["tile"], c["mask"])
    res = count_slide(img, model, tile=c["tile"], batch_size=c["batch"], mask=c["mask"], progress=False,
                      backend="eager", workers=2, points=True)
    ref = locate(cmk, patch_size=32, stride=c["stride"], total=res.total)
    assert len(res.points) == len(ref) == max(0, round(res.total))
    # level 0 is the counted level here: (x, y) = (col + 0.5, row + 0.5)
    same_points(res.points[:, ::-1] - 0.5, ref.coords, 0.01)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=slide_cases())
def test_count_slide_points_equal_whole_image_points(c):
    check_slide_case(c)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=slide_cases())
def test_count_slide_points_equal_whole_image_points_many(c):
    check_slide_case(c)


# --------------------------------------------------------------------------- image-guided points

def guide_coverage(shape, kept, g, params):
    """Guide cells some kept tile determines (all of them when no tile is skipped)."""
    m, s = params.reach(), g.stride
    cells = (-(-shape[0] // s), -(-shape[1] // s))
    cov = torch.zeros(cells, dtype=torch.bool)
    for t in kept:
        _, _, y0, y1 = guide_span(t.iy0, t.iy1, shape[0], m, s)
        _, _, x0, x1 = guide_span(t.ix0, t.ix1, shape[1], m, s)
        cov[y0:y1, x0:x1] = True
    return cov


def guided_reference(F, img, g, params, total, coverage, **opts):
    """locate(F, image=img) with the guide zeroed where no kept tile determines it."""
    h, w = img.shape[:2]
    loc = Locator(h, w, g, params=params, **opts)
    x = torch.from_numpy(img).permute(2, 0, 1)
    guide = guide_cells(x, params, g.stride, (0, 0), (h, w))[2] * coverage
    idx = list(range(loc.n_blocks))
    cands = loc.solve(idx, torch.stack([loc.crop_window(F, i) for i in idx]),
                      torch.stack([loc.crop_guide(guide, i) for i in idx]))
    return loc.finish(cands, total)


def random_params(rng, g):
    sigma = float(rng.choice([1.0, 2.0, 3.5, 5.0 if g.stride == 1 else 4.0]))
    return LocateParams(eps=float(rng.choice([1e-4, 1e-3])), smooth=float(rng.choice([0.0, 1.5, 3.0])),
                        guide=str(rng.choice(["dark", "bright"])), guide_sigma=sigma)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=fed_cases())
def test_guided_tiles_give_the_whole_image_points(c):
    # With the image as a guide, each tile's pixels determine their part of the guide bit for bit:
    # fed in any order (and mask), the consumer finds the points of the whole image.
    rng = np.random.default_rng(c["seed"])
    g = Geometry(32, c["stride"])
    h, w = c["h"], c["w"]
    params = random_params(rng, g)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    F, mask, kept, Fk, total = noisy_case(rng, c, g)
    opts = dict(block=c["block"], halo=c["halo"])
    cov = guide_coverage((h, w), kept, g, params)
    if mask is None:  # the tile halo covers the guide's reach: every cell is determined
        assert bool(cov.all())
        whole = locate(F, patch_size=32, stride=c["stride"], image=img, params=params, total=total, **opts)
    ref = guided_reference(Fk, img, g, params, total, cov, **opts)
    if mask is None:
        same_points(whole.coords, ref.coords, 1e-9)

    order = list(kept)
    if c["order"] != "raster":
        rng.shuffle(order)
    sp = SlidePoints((h, w), g, kept, params, **opts)
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    for t in order:
        hh, ww = t.cy1 - t.cy0, t.cx1 - t.cx0
        sp(t, F[t.gy0 : t.gy0 + hh, t.gx0 : t.gx0 + ww].clone(), x[:, t.iy0 : t.iy1, t.ix0 : t.ix1])
    got = sp.finish(total)
    assert len(got) == len(ref) == max(0, round(total))
    same_points(got.coords, ref.coords, 1e-9)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=slide_cases())
def test_count_slide_guided_points_equal_whole_image_points(c):
    # A model whose weights carry guided LocateParams: count_slide(points=True) reads them and
    # gives the whole image's points.
    base = tiny_model(c["stride"], c["seed"])
    model = copy.deepcopy(base)
    g = model.geometry
    params = random_params(np.random.default_rng(c["seed"] + 17 * c["h"]), g)
    model.metadata = {"locate": params.to_json()}
    assert LocateParams.of(model) == params
    img = np.random.default_rng(c["h"] * 1000 + c["w"]).integers(0, 256, (c["h"], c["w"], 3), dtype=np.uint8)
    with torch.inference_mode():
        cm = model(torch.from_numpy(img).permute(2, 0, 1)[None].float())[0, 0].double()
    cmk = cm * kept_count_map(model, img.shape[:2], c["tile"], c["mask"])
    res = count_slide(img, model, tile=c["tile"], batch_size=c["batch"], mask=c["mask"], progress=False,
                      backend="eager", workers=2, points=True)
    kept = keep_mask(img.shape[:2], c["tile"], g, c["mask"])
    ref = guided_reference(cmk, img, g, params, res.total, guide_coverage(img.shape[:2], kept, g, params))
    assert len(res.points) == len(ref) == max(0, round(res.total))
    same_points(res.points[:, ::-1] - 0.5, ref.coords, 0.01)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=fed_cases())
def test_guided_tiles_give_the_whole_image_points_many(c):
    test_guided_tiles_give_the_whole_image_points.hypothesis.inner_test(c)
