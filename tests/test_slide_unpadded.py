"""The cpu backend's unpadded first conv, and count_slide's use of it (slide/compute.py):
same count map as the padded call, at odd sizes and strides, interior and border tiles."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcount import CountCeption, count_slide, redundant_count
from fastcount.inference import compile as fc_compile
from fastcount.testing import randomize_bn

from conftest import rel_err

# fp32 oneDNN convs on the same values in a different blocking: measured max |diff| / max |map|
# 2.5e-7; the tiled count against the whole image's is checked relative to sum|map| (as in
# tests/test_slide_exact.py).
MAP_TOL = 1e-5
COUNT_TOL = 1e-5


def _model(stride, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(CountCeption(stride=stride, width=0.0625), seed=seed).eval()


@pytest.mark.parametrize("stride", [1, 2, 8])
def test_unpadded_of_padded_input_equals_call(stride, one_thread):
    fn = fc_compile(_model(stride), backend="cpu")
    x = torch.rand(2, 3, 45, 71, generator=torch.Generator().manual_seed(stride)) * 255
    ref = fn(x)
    got = fn.unpadded(F.pad(x, (32, 32, 32, 32)))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < MAP_TOL


def test_unpadded_interior_rows_equal_whole_image(one_thread):
    """An interior region's unpadded map is the whole image's map, 6 rows in from each cut side."""
    fn = fc_compile(_model(1), backend="cpu")
    x = torch.rand(1, 3, 161, 149, generator=torch.Generator().manual_seed(3)) * 255
    whole = fn(x)
    a, b, c, d = 40, 131, 25, 120  # rows [a, b), cols [c, d): all four sides cut inside the image
    part = fn.unpadded(x[:, :, a:b, c:d])
    assert part.shape[2:] == (b - a - 32, d - c - 32)
    # local row j is full-resolution row j + a + 32
    ref = whole[:, :, a + 32 + 6 : b - 6, c + 32 + 6 : d - 6]
    assert rel_err(part[:, :, 6:-6, 6:-6], ref) < MAP_TOL


def test_unpadded_refuses_inputs_not_larger_than_the_patch():
    fn = fc_compile(_model(1), backend="cpu")
    with pytest.raises(ValueError, match="larger than the patch size 32"):
        fn.unpadded(torch.zeros(1, 3, 32, 80))


@pytest.mark.parametrize("stride,tile,batch", [(1, 48, 1), (4, 40, 4), (2, 64, 3)])
def test_count_slide_cpu_equals_whole_image(stride, tile, batch, one_thread):
    """Interior tiles on both axes, and batches that mix border and interior tiles of one shape."""
    model = _model(stride, seed=stride)
    img = np.random.default_rng(tile).integers(0, 256, (157, 141, 3), dtype=np.uint8)
    with torch.inference_mode():
        cm = model(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    whole = float(redundant_count(cm, 32, stride).sum())
    scale = float(cm.double().abs().sum()) / model.geometry.redundancy
    res = count_slide(img, model, tile=tile, batch_size=batch, mask=None, backend="cpu", device="cpu",
                      progress=False, workers=1, cell=8)
    assert res.stats["backend"] == "cpu" and res.stats["tiles_total"] >= 9
    assert abs(res.total - whole) <= COUNT_TOL * scale
    dens = redundant_count(cm[0, 0].double(), 32, stride, cell=8).numpy()
    np.testing.assert_allclose(res.density, dens, rtol=0, atol=COUNT_TOL * scale)
