import numpy as np
import pytest
import torch

import fastcount
from fastcount.ops import make_targets_reference, redundant_count_reference


def brute_targets(dots: np.ndarray, r: int, s: int) -> np.ndarray:
    """Independent reference: splat each dot into the r x r block of windows that see it."""
    h, w = dots.shape
    t = np.zeros((h + r, w + r), dtype=np.int64)
    for i, j in zip(*np.nonzero(dots)):
        t[i + 1 : i + r + 1, j + 1 : j + r + 1] += int(dots[i, j])
    return t[::s, ::s]


def random_dots(rng, h, w, density=0.05, maxc=3):
    d = (rng.random((h, w)) < density) * rng.integers(1, maxc + 1, (h, w))
    return d.astype(np.int64)


SHAPES = [(1, 1), (1, 7), (5, 1), (3, 4), (31, 33), (32, 32), (47, 20), (64, 65)]


@pytest.mark.parametrize("h,w", SHAPES)
@pytest.mark.parametrize("r,s", [(32, 1), (32, 2), (32, 8), (32, 32), (8, 4), (12, 1)])
def test_targets_match_bruteforce(h, w, r, s):
    rng = np.random.default_rng(h * 1000 + w + r + s)
    d = random_dots(rng, h, w, density=0.2)
    d[0, 0] += 1  # at least one dot, in a corner
    want = brute_targets(d, r, s)
    got = fastcount.make_targets(d, r, s)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    assert np.array_equal(got.numpy().astype(np.int64), want)
    assert torch.equal(make_targets_reference(torch.from_numpy(d), r, s), got)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.float32, np.float64, np.bool_])
def test_targets_dtypes(dtype):
    rng = np.random.default_rng(1)
    d = random_dots(rng, 19, 23, maxc=1)
    got = fastcount.make_targets(d.astype(dtype))
    assert np.array_equal(got.numpy(), brute_targets(d, 32, 1).astype(np.float32))


def test_targets_batch_and_tensor():
    rng = np.random.default_rng(2)
    d = np.stack([random_dots(rng, 21, 30) for _ in range(3)])
    got = fastcount.make_targets(torch.from_numpy(d), 32, 4)
    assert got.shape == (3, 14, 16)
    for b in range(3):
        assert np.array_equal(got[b].numpy(), brute_targets(d[b], 32, 4).astype(np.float32))


@pytest.mark.parametrize("s", [1, 2, 4, 8, 16, 32])
def test_exact_count_recovery(s):
    rng = np.random.default_rng(s)
    for h, w in [(1, 1), (13, 7), (100, 57), (256, 256)]:
        d = random_dots(rng, h, w, density=0.1, maxc=5)
        c = fastcount.redundant_count(fastcount.make_targets(d, 32, s), 32, s)
        assert c.dtype == torch.float64
        assert float(c) == float(d.sum())


def test_large_map_stays_exact():
    """An fp32 summed-area table would be off by counts here; running sums are not."""
    rng = np.random.default_rng(7)
    d = rng.integers(0, 3, (1500, 1300)).astype(np.int32)
    t = fastcount.make_targets(d)
    assert float(fastcount.redundant_count(t)) == float(d.sum())
    # spot-check interior windows against direct sums
    for y, x in [(40, 40), (1000, 777), (1531, 1331), (33, 1200)]:
        want = d[max(0, y - 32) : y, max(0, x - 32) : x].sum()
        assert t[y, x].item() == want


def test_points_form_equals_dense():
    rng = np.random.default_rng(3)
    h, w = 45, 38
    pts = np.stack([rng.integers(0, h, 200), rng.integers(0, w, 200)], 1)
    pts = np.concatenate([pts, pts[:10]])  # duplicates count twice
    dense = np.zeros((h, w), np.int64)
    np.add.at(dense, (pts[:, 0], pts[:, 1]), 1)
    for s in (1, 4):
        a = fastcount.make_targets_from_points(pts, (h, w), 32, s)
        assert torch.equal(a, fastcount.make_targets(dense, 32, s))
    empty = fastcount.make_targets_from_points(np.zeros((0, 2), np.int64), (5, 6))
    assert empty.shape == (37, 38) and float(empty.sum()) == 0


def test_redundant_count_shapes_and_cells():
    x = torch.rand(3, 1, 45, 38)
    c = fastcount.redundant_count(x)
    assert c.shape == (3, 1) and c.dtype == torch.float64
    assert torch.allclose(c.flatten(), x.double().sum((1, 2, 3)) / 1024)
    assert fastcount.redundant_count(x[0, 0]).shape == ()
    cells = fastcount.redundant_count(x, cell=16)
    assert cells.shape == (3, 1, 3, 3)
    assert torch.allclose(cells.sum((-2, -1)), c, rtol=1e-12)
    assert torch.equal(redundant_count_reference(x, 32, 1, 16), cells)


def test_target_errors():
    with pytest.raises(ValueError, match="dots must be"):
        fastcount.make_targets(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="non-negative"):
        fastcount.make_targets(np.array([[1, -1]]))
    with pytest.raises(ValueError, match="NaN"):
        fastcount.make_targets(np.array([[1.0, np.nan]]))
    with pytest.raises(TypeError, match="dots must be"):
        fastcount.make_targets([[1, 0]])
    with pytest.raises(ValueError, match="stride must divide"):
        fastcount.make_targets(np.zeros((4, 4)), 32, 3)
    with pytest.raises(ValueError, match="outside the image"):
        fastcount.make_targets_from_points(np.array([[0, 0], [5, 1]]), (5, 5))
    with pytest.raises(ValueError, match="points must have shape"):
        fastcount.make_targets_from_points(np.zeros((3,)), (5, 5))
    with pytest.raises(ValueError, match="height must be"):
        fastcount.make_targets_from_points(np.zeros((0, 2)), (-1, 5))
    with pytest.raises(ValueError, match="cell"):
        fastcount.redundant_count(torch.zeros(4, 4), cell=-1)
    with pytest.raises(ValueError, match="count_map"):
        fastcount.redundant_count(torch.zeros(4))
