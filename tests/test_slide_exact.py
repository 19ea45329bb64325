"""count_slide's promise: the tiled count equals the whole-image count (any backend, tile, stride, cell, mask)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import gpu, randomize_bn
from fastcount import CountCeption, count_slide, redundant_count
from fastcount.geometry import Geometry
from fastcount.inference import available_backends
from fastcount.slide import MIN_TILE, plan_tiles


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS = {}


def tiny_model(stride: int, seed: int) -> CountCeption:
    key = (stride, seed)
    if key not in _MODELS:
        torch.manual_seed(seed)
        _MODELS[key] = randomize_bn(CountCeption(width=0.0625, stride=stride), seed=seed).eval()
    return _MODELS[key]


def whole_image(model, img):
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        cm = model(x)
    ref = float(redundant_count(cm, model.patch_size, model.stride).sum())
    scale = float(cm.double().abs().sum()) / model.geometry.redundancy
    return ref, scale, cm


def check(model, img, tile, batch_size, backend="eager", cell=None, mask=None, device="cpu"):
    """count_slide(img) against the whole-image count map, restricted to the tiles the mask keeps
    (a tile is kept when any mask pixel of its input box is set; ``mask`` is full resolution)."""
    _, scale, cm = whole_image(model, img)
    keep = kept_count_map(model, img.shape[:2], tile, mask)
    res = count_slide(img, model, tile=tile, batch_size=batch_size, mask=mask, progress=False, backend=backend,
                      device=device, workers=2, cell=cell)
    cmk = cm[0, 0].double() * keep
    ref = float(cmk.sum()) / model.geometry.redundancy
    assert abs(res.total - ref) <= 1e-5 * scale, (res.total, ref)
    # The density grid partitions the same count map: whole-image density on kept blocks, exactly 0 elsewhere.
    assert abs(res.density.sum() - res.total) <= 1e-9 * scale
    dens_ref = redundant_count(cmk, model.patch_size, model.stride, cell=res.cell).numpy()
    np.testing.assert_allclose(res.density, dens_ref, rtol=0, atol=1e-5 * scale)
    kept_blocks = redundant_count(keep.double(), model.patch_size, model.stride, cell=res.cell).numpy() > 0
    assert (res.density[~kept_blocks] == 0).all()
    assert res.stats["tiles_processed"] == res.stats["tiles_total"] - res.stats["tiles_skipped"]
    return res


def kept_count_map(model, shape, tile, mask):
    """Boolean mask of the (strided) count map: pixels whose tile is kept."""
    g = model.geometry
    plan = plan_tiles(*shape, tile, g)
    keep = torch.zeros(plan.out_shape, dtype=torch.bool)
    for t in plan.tiles:
        if mask is None or mask[t.iy0 : t.iy1, t.ix0 : t.ix1].any():
            keep[t.gy0 : t.gy0 + t.cy1 - t.cy0, t.gx0 : t.gx0 + t.cx1 - t.cx0] = True
    return keep


def accepted_tiles(stride: int, most: int = 160):
    """Every tile side the API accepts for this stride (multiples of it, >= MIN_TILE), up to ``most``."""
    lo = -(-MIN_TILE // stride)
    return st.integers(lo, max(lo, most // stride)).map(lambda k: k * stride)


@st.composite
def slide_cases(draw, backends=("eager", "cpu")):
    h, w = draw(st.integers(1, 130)), draw(st.integers(1, 130))
    stride = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    tile = draw(accepted_tiles(stride))
    mask = None
    kind = draw(st.sampled_from(["none", "none", "blocks", "edges", "all", "empty"]))
    if kind == "edges":
        # Single foreground pixels on the first/last row or column of some tiles' input boxes:
        # those tiles are kept only because of that one pixel.
        tiles = plan_tiles(h, w, tile, Geometry(32, stride)).tiles
        mask = np.zeros((h, w), bool)
        for _ in range(draw(st.integers(1, 3))):
            t = draw(st.sampled_from(tiles))
            y = draw(st.sampled_from([t.iy0, t.iy1 - 1, (t.iy0 + t.iy1) // 2]))
            x = draw(st.sampled_from([t.ix0, t.ix1 - 1, (t.ix0 + t.ix1) // 2]))
            mask[y, x] = True
    elif kind != "none":
        # Blocky random foreground at full resolution, so some tiles are kept and some skipped.
        b = draw(st.integers(4, 48))
        p = {"blocks": draw(st.sampled_from([0.1, 0.3, 0.6])), "all": 1.0, "empty": 0.0}[kind]
        low = np.random.default_rng(h * 131 + w).random((-(-h // b), -(-w // b))) < p
        mask = np.kron(low, np.ones((b, b), bool))[:h, :w]
    return dict(h=h, w=w, stride=stride, tile=tile, mask=mask, backend=draw(st.sampled_from(backends)),
                batch=draw(st.sampled_from([1, 2, 5])), cell=draw(st.one_of(st.none(), st.integers(1, 40))),
                seed=draw(st.integers(0, 3)))


def run_case(c, device="cpu"):
    if c["backend"] not in available_backends(device):
        pytest.skip(f"backend {c['backend']!r} is not available for {device} on this machine")
    model = tiny_model(c["stride"], c["seed"])
    img = np.random.default_rng(c["h"] * 1000 + c["w"]).integers(0, 256, (c["h"], c["w"], 3), dtype=np.uint8)
    check(model, img, c["tile"], c["batch"], backend=c["backend"], cell=c["cell"], mask=c["mask"], device=device)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=slide_cases())
def test_tiled_equals_whole_property(c):
    run_case(c)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=slide_cases())
def test_tiled_equals_whole_property_many(c):
    run_case(c)


@gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=slide_cases(backends=("eager", "triton")))
def test_cuda_tiled_equals_whole_property(c):
    # fp32 without TF32, so the GPU is held to the same tolerance as the CPU reference.
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        run_case(c, device="cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.parametrize("corner", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_one_mask_pixel_on_an_input_box_corner_keeps_that_tile(corner):
    # The middle tile of a 3 x 3 plan, kept only because of one pixel on its input box's edge.
    model = tiny_model(2, 0)
    img = np.random.default_rng(7).integers(0, 256, (60, 50, 3), dtype=np.uint8)
    t = plan_tiles(60, 50, 32, model.geometry).tiles[4]
    mask = np.zeros((60, 50), bool)
    mask[(t.iy0, t.iy1 - 1)[corner[0]], (t.ix0, t.ix1 - 1)[corner[1]]] = True
    res = check(model, img, 32, 1, mask=mask)
    assert 0 < res.stats["tiles_skipped"] < res.stats["tiles_total"] == 9


@pytest.mark.parametrize("shape", [(1, 1), (1, 97), (97, 1), (2, 130), (45, 45)])
@pytest.mark.parametrize("tile", [16, 40])
def test_strips_and_tiny_images(shape, tile):
    img = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    check(tiny_model(1, 0), img, tile, 3)


def test_image_smaller_than_one_tile_is_one_tile():
    img = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    res = check(tiny_model(2, 1), img, 1024, None)
    assert res.stats["tiles_processed"] == 1


def test_plan_partitions_count_map():
    for h, w, tile, s in [(1, 1, 16, 1), (100, 37, 32, 4), (300, 250, 48, 8), (7, 200, 16, 2)]:
        model = tiny_model(s, 0)
        plan = plan_tiles(h, w, tile, model.geometry)
        cover = np.zeros(plan.out_shape, dtype=np.int64)
        for t in plan.tiles:
            cover[t.gy0 : t.gy0 + t.cy1 - t.cy0, t.gx0 : t.gx0 + t.cx1 - t.cx0] += 1
            assert t.iy0 % s == 0 and t.ix0 % s == 0 and 0 <= t.iy0 < t.iy1 <= h and 0 <= t.ix0 < t.ix1 <= w
        assert (cover == 1).all()


@pytest.mark.parametrize("tile", [0, 8, MIN_TILE - 1, 20.0, True])
def test_rejects_small_or_bad_tiles(tile):
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises((ValueError, TypeError), match="tile"):
        count_slide(img, tiny_model(1, 0), tile=tile, progress=False)


def test_tile_must_align_with_stride():
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="multiple of the model's output stride 8"):
        count_slide(img, tiny_model(8, 0), tile=20, progress=False)


def test_float_and_grayscale_inputs_count_like_the_tensor():
    model = tiny_model(1, 2)
    rng = np.random.default_rng(3)
    f = rng.uniform(0, 255, (40, 33, 3)).astype(np.float32)
    check(model, f, 16, 2)  # float arrays are used as is, not rounded
    g = rng.integers(0, 256, (40, 33), dtype=np.uint8)
    ref, scale, _ = whole_image(model, np.repeat(g[:, :, None], 3, axis=2))
    res = count_slide(g, model, tile=16, mask=None, progress=False, backend="eager")
    assert abs(res.total - ref) <= 1e-5 * scale


def test_callers_model_is_left_alone():
    model = tiny_model(1, 0)
    model.train()
    try:
        count_slide(np.zeros((10, 10, 3), np.uint8), model, tile=16, mask=None, progress=False, backend="eager")
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("cell", [1, 7, 64])
def test_density_any_cell(cell):
    model = tiny_model(2, 1)
    img = np.random.default_rng(4).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    ref, scale, cm = whole_image(model, img)
    res = count_slide(img, model, tile=32, cell=cell, mask=None, progress=False, batch_size=2)
    assert res.cell == cell
    np.testing.assert_allclose(res.density, redundant_count(cm[0, 0], 32, 2, cell=cell).numpy(), atol=1e-5 * scale)


def test_tiles_are_evened_out():
    # 1056 output rows with tile 512: three tiles of 352, not 512 + 512 + 32.
    plan = plan_tiles(1024, 1024, 512, tiny_model(1, 0).geometry)
    assert plan.grid == (3, 3) and {t.oy1 - t.oy0 for t in plan.tiles} == {352}
