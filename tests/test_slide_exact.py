"""count_slide's core promise: the tiled count equals the whole-image count (SPEC §3)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import randomize_bn
from fastcount import CountCeption, count_slide, redundant_count
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


def check(model, img, tile, batch_size):
    ref, scale, cm = whole_image(model, img)
    res = count_slide(img, model, tile=tile, batch_size=batch_size, mask=None, progress=False, backend="eager",
                      device="cpu", workers=2)
    assert abs(res.total - ref) <= 1e-5 * scale, (res.total, ref)
    # The density grid partitions the same count map.
    assert abs(res.density.sum() - res.total) <= 1e-9 * scale
    dens_ref = redundant_count(cm[0, 0], model.patch_size, model.stride, cell=res.cell).numpy()
    np.testing.assert_allclose(res.density, dens_ref, rtol=0, atol=1e-5 * scale)
    return res


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(1, 130),
    w=st.integers(1, 130),
    stride=st.sampled_from([1, 2, 4, 8]),
    tile_mult=st.integers(1, 6),
    batch=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 3),
)
def test_tiled_equals_whole_property(h, w, stride, tile_mult, batch, seed):
    model = tiny_model(stride, seed)
    tile = max(MIN_TILE, stride) * tile_mult
    tile = -(-tile // stride) * stride
    img = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    check(model, img, tile, batch)


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
