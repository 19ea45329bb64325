"""The compiled ops (csrc/, torch.ops.fastcount.*) against the PyTorch references.

Inputs are fresh random draws every run (the seed is printed in failure
messages; set FASTCOUNT_TEST_SEED to replay one). CI builds the extension, so
these tests fail, not skip, when it is missing; only the CUDA comparisons skip,
with a reason, on machines without a GPU.
"""
import os
import random

import numpy as np
import pytest
import torch

import fastcount
from conftest import gpu
from fastcount import ops
from fastcount.ops import (
    make_targets_from_points_reference,
    make_targets_reference,
    redundant_count_reference,
)

SEED = int(os.environ.get("FASTCOUNT_TEST_SEED", random.SystemRandom().randrange(2**31)))
OPS = getattr(torch.ops, "fastcount", None)


def gen(salt=0):
    return torch.Generator().manual_seed(SEED + salt)


def random_dots(shape, dtype, g, high=4, density=0.3):
    """Sparse non-negative integer counts as `dtype`."""
    d = torch.randint(0, high, shape, generator=g) * (torch.rand(shape, generator=g) < density)
    return d.to(dtype)


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.int32 if a.element_size() == 4 else torch.int64), b.view(-1).view(torch.int32 if b.element_size() == 4 else torch.int64))


@pytest.fixture(autouse=True, scope="module")
def _require_extension():
    assert ops.has_compiled_ops(), (
        f"fastcount._C is not built/loadable ({ops.compiled_ops_error()!r}); "
        "build it with `pip install --no-build-isolation -e .`"
    )


def test_extension_is_built_and_used():
    assert ops.has_compiled_ops(), repr(ops.compiled_ops_error())
    assert ops._use_compiled(torch.zeros(1))
    for name in ("make_targets", "make_targets_from_points", "redundant_count"):
        assert hasattr(torch.ops.fastcount, name)


# --------------------------------------------------------------------------- make_targets

SHAPES = [(1, 1), (1, 7), (7, 1), (31, 33), (257, 129), (3, 1000), (600, 5)]
GEOMS = [(32, 1), (32, 2), (32, 4), (32, 8), (32, 32), (4, 1), (16, 16), (64, 8), (12, 3)]


@pytest.mark.parametrize("patch_size,stride", GEOMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_make_targets_exact(shape, patch_size, stride):
    g = gen(hash((shape, patch_size, stride)) % 1000)
    dots = random_dots(shape, torch.int32, g)
    got = torch.ops.fastcount.make_targets(dots, patch_size, stride)
    want = make_targets_reference(dots, patch_size, stride)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), f"seed {SEED}"
    # every dot lands in (r/s)^2 sampled cells
    assert float(got.double().sum()) == float(dots.sum()) * (patch_size // stride) ** 2


@pytest.mark.parametrize("stride", [1, 2, 4, 8, 32])
def test_make_targets_large_odd(stride):
    g = gen(7 + stride)
    h, w = 2000 + int(torch.randint(0, 999, (1,), generator=g)), 1000 + int(torch.randint(0, 999, (1,), generator=g))
    dots = random_dots((h, w), torch.uint8, g, high=3, density=0.01)
    assert torch.equal(torch.ops.fastcount.make_targets(dots, 32, stride), make_targets_reference(dots, 32, stride)), (
        f"seed {SEED}, shape {(h, w)}"
    )


DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 4])
def test_make_targets_dtypes_batch(dtype, stride):
    g = gen(11)
    high = 2 if dtype == torch.bool else 5
    dots = random_dots((3, 45, 301), dtype, g, high=high)
    got = torch.ops.fastcount.make_targets(dots, 32, stride)
    assert got.shape == (3, (45 + 32 + stride - 1) // stride, (301 + 32 + stride - 1) // stride)
    assert torch.equal(got, make_targets_reference(dots, 32, stride)), f"seed {SEED}"
    for b in range(3):  # batch == one image at a time
        assert torch.equal(got[b], torch.ops.fastcount.make_targets(dots[b], 32, stride))


@pytest.mark.parametrize("dtype,value,patch_size", [
    (torch.int16, 32767, 256),   # r*r*max > 2^31: must take the 64-bit accumulator
    (torch.int16, 32767, 128),   # just fits 32 bits
    (torch.uint8, 255, 32),
    (torch.int32, 2**24 + 1, 32),
    (torch.int64, 2**40 + 3, 8),
])
def test_make_targets_large_values_exact(dtype, value, patch_size):
    dots = torch.full((300, 290), value, dtype=dtype)
    dots[::7, ::3] = 0
    want = make_targets_reference(dots, patch_size, patch_size // 4)
    assert torch.equal(torch.ops.fastcount.make_targets(dots, patch_size, patch_size // 4), want)


@pytest.mark.parametrize("patch_size", [2900, 2904])
def test_make_targets_uint8_accumulator_boundary(patch_size):
    """255 * r^2 just below (2900) and above (2904) 2^31: 32- vs 64-bit sums, both exact."""
    dots = torch.full((2950, 2950), 255, dtype=torch.uint8)
    want = make_targets_reference(dots, patch_size, patch_size)
    assert float(want.max()) == float(torch.tensor(255 * patch_size**2, dtype=torch.float32))
    assert torch.equal(torch.ops.fastcount.make_targets(dots, patch_size, patch_size), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_make_targets_fractional_float(dtype):
    g = gen(13)
    dots = (torch.rand((2, 310, 287), generator=g, dtype=torch.float64) * (torch.rand((2, 310, 287), generator=g) < 0.05)).to(dtype)
    dots[:, 100:200, :] = 0  # windows over zeros must come out exactly 0
    got = torch.ops.fastcount.make_targets(dots, 32, 2)
    want = make_targets_reference(dots, 32, 2)
    torch.testing.assert_close(got, want, rtol=3e-7, atol=1e-6, msg=lambda m: f"seed {SEED}: {m}")
    assert torch.equal(got == 0, want == 0), f"seed {SEED}"


def test_make_targets_thread_count_independent():
    """Fixed summation order: float results do not depend on the thread count."""
    g = gen(17)
    # large enough that the CPU kernels split the work across threads
    dots = torch.rand((1500, 3000), generator=g, dtype=torch.float64)
    m = torch.rand((2, 1, 1500, 1000), generator=g)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = torch.ops.fastcount.make_targets(dots, 32, 1), torch.ops.fastcount.redundant_count(m, 32, 1, 33)
        torch.set_num_threads(max(2, n))
        b = torch.ops.fastcount.make_targets(dots, 32, 1), torch.ops.fastcount.redundant_count(m, 32, 1, 33)
    finally:
        torch.set_num_threads(n)
    assert bits_equal(a[0], b[0]) and bits_equal(a[1], b[1])


def test_make_targets_non_contiguous_and_public():
    g = gen(19)
    dots = random_dots((70, 90), torch.int64, g).t()  # a transposed view
    want = make_targets_reference(dots.contiguous(), 32, 4)
    assert torch.equal(torch.ops.fastcount.make_targets(dots, 32, 4), want)
    assert torch.equal(fastcount.make_targets(dots, 32, 4), want)
    assert torch.equal(fastcount.make_targets(dots.numpy().astype(np.uint8), 32, 4), want)
    assert torch.equal(fastcount.make_targets((dots > 0).numpy(), 32, 4), make_targets_reference(dots > 0, 32, 4))


# --------------------------------------------------------------------------- points


@pytest.mark.parametrize("stride", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("hw", [(1, 1), (37, 211), (300, 45)])
def test_points_equal_dense(hw, stride):
    h, w = hw
    g = gen(23 + stride)
    n = int(torch.randint(0, 3 * h * w // 4 + 2, (1,), generator=g))
    pts = torch.stack([torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)], 1)
    pts = torch.cat([pts, pts[: n // 3], torch.tensor([[0, 0], [h - 1, w - 1], [h - 1, w - 1]])])  # duplicates, corners
    dense = torch.zeros((h, w), dtype=torch.int64)
    dense.index_put_((pts[:, 0], pts[:, 1]), torch.ones(len(pts), dtype=torch.int64), accumulate=True)
    got = torch.ops.fastcount.make_targets_from_points(pts, h, w, 32, stride)
    assert torch.equal(got, torch.ops.fastcount.make_targets(dense, 32, stride)), f"seed {SEED}"
    assert torch.equal(got, make_targets_from_points_reference(pts, h, w, 32, stride))
    assert torch.equal(fastcount.make_targets_from_points(pts.numpy(), (h, w), 32, stride), got)


def test_points_empty_and_duplicates():
    empty = torch.zeros((0, 2), dtype=torch.int64)
    out = torch.ops.fastcount.make_targets_from_points(empty, 50, 60, 32, 4)
    assert out.shape == (21, 23) and not out.any()
    twice = torch.ops.fastcount.make_targets_from_points(torch.tensor([[5, 6], [5, 6]]), 50, 60, 32, 1)
    once = torch.ops.fastcount.make_targets_from_points(torch.tensor([[5, 6]]), 50, 60, 32, 1)
    assert torch.equal(twice, 2 * once) and once.sum() == 32 * 32


# --------------------------------------------------------------------------- redundant_count


@pytest.mark.parametrize("shape", [(1, 1), (45, 301), (3, 77, 50), (2, 1, 300, 257), (1, 1, 4, 3000)])
@pytest.mark.parametrize("cell", [0, 1, 3, 32, 100, 5000])
def test_redundant_count_matches_reference(shape, cell):
    g = gen(29 + cell)
    m = torch.rand(shape, generator=g) * 3 - 0.5
    got = torch.ops.fastcount.redundant_count(m, 32, 1, cell)
    want = redundant_count_reference(m, 32, 1, cell)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda s: f"seed {SEED}: {s}")
    assert torch.equal(fastcount.redundant_count(m, 32, 1, cell), got)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("patch_size,stride", [(32, 1), (32, 8), (16, 16)])
def test_redundant_count_integer_valued_exact(dtype, patch_size, stride):
    g = gen(31)
    m = torch.randint(0, 100, (2, 1, 133, 97), generator=g).to(dtype)
    for cell in (0, 8, 50):
        got = torch.ops.fastcount.redundant_count(m, patch_size, stride, cell)
        assert torch.equal(got, redundant_count_reference(m, patch_size, stride, cell))


@pytest.mark.parametrize("cell", [1, 7, 64, 129])
def test_cells_add_up_to_whole(cell):
    g = gen(37)
    m = torch.randint(0, 1000, (3, 1, 211, 389), generator=g).float()  # sums exact in float64
    whole = torch.ops.fastcount.redundant_count(m, 32, 1, 0)
    cells = torch.ops.fastcount.redundant_count(m, 32, 1, cell)
    assert cells.shape == (3, 1, -(-211 // cell), -(-389 // cell))
    assert torch.equal(cells.sum(dim=(-2, -1)), whole)
    # fractional maps: equal up to float64 rounding
    f = torch.rand((2, 300, 301), generator=g)
    torch.testing.assert_close(torch.ops.fastcount.redundant_count(f, 32, 1, cell).sum(dim=(-2, -1)),
                               torch.ops.fastcount.redundant_count(f, 32, 1, 0), rtol=1e-12, atol=0)


def test_make_targets_then_count_roundtrip():
    g = gen(41)
    dots = random_dots((2, 123, 157), torch.uint8, g)
    t = torch.ops.fastcount.make_targets(dots, 32, 4)
    counts = torch.ops.fastcount.redundant_count(t, 32, 4, 0)
    assert torch.equal(counts, dots.sum(dim=(-2, -1)).double())


def test_redundant_count_autograd():
    x = torch.rand((2, 1, 9, 11), dtype=torch.float64, requires_grad=True)
    for cell in (0, 4):
        assert torch.autograd.gradcheck(lambda t: torch.ops.fastcount.redundant_count(t, 8, 2, cell), (x,))
        y = torch.rand(x.shape, dtype=torch.float32, requires_grad=True)
        y2 = y.detach().clone().requires_grad_()
        fastcount.redundant_count(y, 32, 1, cell).sum().backward()
        redundant_count_reference(y2, 32, 1, cell).sum().backward()
        assert torch.allclose(y.grad, y2.grad)


# --------------------------------------------------------------------------- errors

ERRORS = [
    # (callable, exception, message fragment)
    (lambda: torch.ops.fastcount.make_targets(torch.zeros(5, 5), -32, 1), ValueError, "patch_size"),
    (lambda: torch.ops.fastcount.make_targets(torch.zeros(5, 5), 32, 0), ValueError, "stride"),
    (lambda: torch.ops.fastcount.make_targets(torch.zeros(5, 5), 32, 3), ValueError, "divide"),
    (lambda: torch.ops.fastcount.make_targets(torch.zeros(5), 32, 1), ValueError, "dots must be"),
    (lambda: torch.ops.fastcount.make_targets(torch.zeros(1, 2, 5, 5), 32, 1), ValueError, "dots must be"),
    (lambda: torch.ops.fastcount.make_targets(torch.zeros(0, 5), 32, 1), ValueError, "H, W >= 1"),
    (lambda: torch.ops.fastcount.make_targets(torch.zeros(5, 5, dtype=torch.complex64), 32, 1), TypeError, "dots"),
    (lambda: torch.ops.fastcount.make_targets_from_points(torch.tensor([[0, 0], [3, 9], [10, 2]]), 10, 9, 32, 1),
     ValueError, r"points\[1\] = \(3, 9\)"),
    (lambda: torch.ops.fastcount.make_targets_from_points(torch.tensor([[-1, 0]]), 10, 9, 32, 1), ValueError, r"points\[0\]"),
    (lambda: torch.ops.fastcount.make_targets_from_points(torch.zeros(3, 3, dtype=torch.int64), 10, 9, 32, 1),
     ValueError, r"\(N, 2\)"),
    (lambda: torch.ops.fastcount.make_targets_from_points(torch.zeros(3, 2), 10, 9, 32, 1), TypeError, "int64"),
    (lambda: torch.ops.fastcount.make_targets_from_points(torch.zeros(3, 2, dtype=torch.int64), -10, 9, 32, 1),
     ValueError, "height"),
    (lambda: torch.ops.fastcount.make_targets_from_points(torch.zeros(3, 2, dtype=torch.int64), 10, 0, 32, 1),
     ValueError, "width"),
    (lambda: torch.ops.fastcount.make_targets_from_points(torch.zeros(3, 2, dtype=torch.int64), 10, 9, 32, 5),
     ValueError, "divide"),
    (lambda: torch.ops.fastcount.redundant_count(torch.zeros(5), 32, 1, 0), ValueError, "count_map must be"),
    (lambda: torch.ops.fastcount.redundant_count(torch.zeros(1, 1, 1, 5, 5), 32, 1, 0), ValueError, "count_map must be"),
    (lambda: torch.ops.fastcount.redundant_count(torch.zeros(5, 5), 32, 1, -2), ValueError, "cell"),
    (lambda: torch.ops.fastcount.redundant_count(torch.zeros(5, 5), 32, 6, 0), ValueError, "divide"),
    (lambda: torch.ops.fastcount.redundant_count(torch.zeros(5, 5, dtype=torch.bool), 32, 1, 0), TypeError, "count_map"),
    # the public functions
    (lambda: fastcount.make_targets(torch.zeros(5, 5), 32, 3), ValueError, "divide"),
    (lambda: fastcount.make_targets(torch.zeros(5, 5), -4, 1), ValueError, "patch_size"),
    (lambda: fastcount.make_targets(torch.zeros(5), 32, 1), ValueError, "dots must be"),
    (lambda: fastcount.make_targets(-torch.ones(5, 5), 32, 1), ValueError, "non-negative"),
    (lambda: fastcount.make_targets_from_points(torch.tensor([[0, 0], [10, 0]]), (10, 9)), ValueError, r"points\[1\]"),
    (lambda: fastcount.make_targets_from_points(torch.tensor([[0, 9]]), (10, 9)), ValueError, r"points\[0\]"),
    (lambda: fastcount.make_targets_from_points(torch.tensor([[0, 0]]), (-1, 9)), ValueError, "height"),
    (lambda: fastcount.make_targets_from_points(torch.tensor([0, 0]), (10, 9)), ValueError, r"\(N, 2\)"),
    (lambda: fastcount.redundant_count(torch.zeros(5), 32, 1), ValueError, "count_map must be"),
    (lambda: fastcount.redundant_count(torch.zeros(5, 5), 32, 1, cell=-1), ValueError, "cell"),
    (lambda: fastcount.redundant_count(torch.zeros(5, 5), 32, 0), ValueError, "stride"),
]


@pytest.mark.parametrize("call,exc,match", ERRORS, ids=[f"err{i}" for i in range(len(ERRORS))])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- torch.compile / fake kernels


def test_opcheck():
    g = gen(43)
    dots = random_dots((2, 20, 30), torch.int32, g)
    pts = torch.tensor([[0, 0], [4, 7], [19, 29], [4, 7]])
    m = torch.rand((2, 1, 20, 30), generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcount.make_targets.default, (dots, 32, 4))
    torch.library.opcheck(torch.ops.fastcount.make_targets_from_points.default, (pts, 20, 30, 32, 8))
    torch.library.opcheck(torch.ops.fastcount.redundant_count.default, (m, 32, 1, 0))
    torch.library.opcheck(torch.ops.fastcount.redundant_count.default, (m, 32, 1, 7))


def test_meta_tensors():
    out = torch.ops.fastcount.make_targets(torch.empty((3, 100, 50), device="meta", dtype=torch.uint8), 32, 4)
    assert out.shape == (3, 33, 21) and out.dtype == torch.float32 and out.device.type == "meta"
    out = torch.ops.fastcount.redundant_count(torch.empty((2, 1, 100, 50), device="meta"), 32, 1, 16)
    assert out.shape == (2, 1, 7, 4) and out.dtype == torch.float64


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(dots, pts, pred):
        t = torch.ops.fastcount.make_targets(dots, 32, 4)
        tp = torch.ops.fastcount.make_targets_from_points(pts, 40, 50, 32, 4)
        loss = (pred - t).abs().mean()
        return loss, torch.ops.fastcount.redundant_count(t, 32, 4, 0), torch.ops.fastcount.redundant_count(tp, 32, 4, 5)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    g = gen(47)
    for b in (2, 3):  # a second shape exercises recompilation / symbolic shapes
        dots = random_dots((b, 40, 50), torch.int64, g)
        pts = torch.stack([torch.randint(0, 40, (25,), generator=g), torch.randint(0, 50, (25,), generator=g)], 1)
        pred = torch.rand((b, 18, 21), generator=g)
        got, want = compiled(dots, pts, pred), step(dots, pts, pred)
        torch.testing.assert_close(got[0], want[0])  # inductor may reorder the mean
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


# --------------------------------------------------------------------------- CUDA


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_make_targets_bitwise(dtype):
    assert ops._C.with_cuda, "the extension was built without its CUDA kernels"
    g = gen(53)
    for shape, r, s in [((1, 1), 32, 1), ((3, 301, 517), 32, 1), ((1100, 333), 32, 4), ((2, 259, 263), 16, 16)]:
        dots = random_dots(shape, dtype, g, high=2 if dtype == torch.bool else 5)
        cpu = torch.ops.fastcount.make_targets(dots, r, s)
        cuda = torch.ops.fastcount.make_targets(dots.cuda(), r, s)
        assert cuda.is_cuda and bits_equal(cuda.cpu(), cpu), (shape, r, s)
    if dtype.is_floating_point:  # fractional values: same canonical order, same bits
        dots = torch.rand((2, 700, 650), generator=g).to(dtype)
        assert bits_equal(torch.ops.fastcount.make_targets(dots.cuda(), 32, 2).cpu(),
                          torch.ops.fastcount.make_targets(dots, 32, 2))


@gpu
@pytest.mark.parametrize("stride", [1, 4, 32])
def test_cuda_points_bitwise(stride):
    g = gen(59)
    pts = torch.stack([torch.randint(0, 1234, (5000,), generator=g), torch.randint(0, 777, (5000,), generator=g)], 1)
    cpu = torch.ops.fastcount.make_targets_from_points(pts, 1234, 777, 32, stride)
    cuda = torch.ops.fastcount.make_targets_from_points(pts.cuda(), 1234, 777, 32, stride)
    assert cuda.is_cuda and bits_equal(cuda.cpu(), cpu)
    assert torch.equal(fastcount.make_targets_from_points(pts.cuda(), (1234, 777), 32, stride).cpu(), cpu)
    with pytest.raises(ValueError, match=r"points\[1\]"):
        torch.ops.fastcount.make_targets_from_points(torch.tensor([[0, 0], [1234, 0]], device="cuda"), 1234, 777, 32, 1)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int32, torch.uint8])
@pytest.mark.parametrize("cell", [0, 1, 5, 32, 300])
def test_cuda_redundant_count_bitwise(dtype, cell):
    g = gen(61)
    m = (torch.rand((2, 1, 613, 1027), generator=g) * 50).to(dtype)
    cpu = torch.ops.fastcount.redundant_count(m, 32, 1, cell)
    cuda = torch.ops.fastcount.redundant_count(m.cuda(), 32, 1, cell)
    assert cuda.is_cuda and bits_equal(cuda.cpu(), cpu)
    assert bits_equal(fastcount.redundant_count(m.cuda(), 32, 1, cell).cpu(), cpu)


def test_import_without_extension_falls_back(tmp_path):
    """A missing or broken fastcount._C must not break `import fastcount`."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['fastcount._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch, fastcount\n"
        "from fastcount import ops\n"
        "assert not ops.has_compiled_ops() and isinstance(ops.compiled_ops_error(), ImportError)\n"
        "d = torch.zeros(9, 7, dtype=torch.int64); d[3, 4] = 2\n"
        "t = fastcount.make_targets(d, 32, 4)\n"
        "assert torch.equal(t, ops.make_targets_reference(d, 32, 4))\n"
        "assert float(fastcount.redundant_count(t, 32, 4)) == 2.0\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert res.returncode == 0, res.stderr
