"""Compiled ops against plain PyTorch, in one session.

    python -m pytest benchmarks/bench_ops.py --benchmark-only \
        --benchmark-columns=median,rounds --benchmark-json=bench_ops.json
    FASTCOUNT_BENCH_THREADS=1 python -m pytest benchmarks/bench_ops.py ...   # one thread

Every case runs its plain-PyTorch baselines first (same process, same inputs);
the compiled case then records in ``extra_info``: ``mpx_per_s`` (input
megapixels per second), ``speedup_vs_torch_best`` (the fastest exact plain
PyTorch implementation: separable cumsum with contiguous scans),
``speedup_vs_reference`` (fastcount.ops.*_reference), and ``gbps`` / ``of_copy_bw``:
the minimum traffic (read input once, write output once) per second, and that
as a fraction of this machine's copy bandwidth measured in the same session;
``output_first_touch_s``: allocating and filling a fresh tensor of the output's
shape, the floor for any op returning a new tensor (page faults included).
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F

from fastcount import ops

SIDE = 4096
R = 32
_medians: dict = {}
# FASTCOUNT_BENCH_THREADS=1 gives steadier figures on a machine shared with other work.
if os.environ.get("FASTCOUNT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTCOUNT_BENCH_THREADS"]))


def _time(fn, rounds=3):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Bytes read + written per second by a 256 MiB tensor copy (all threads)."""
    src = torch.ones(64 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    s = _time(lambda: dst.copy_(src), rounds=5)
    return 2 * src.numel() * 4 / s


@pytest.fixture(scope="module", autouse=True)
def _need_ops():
    assert ops.has_compiled_ops(), f"fastcount._C not built: {ops.compiled_ops_error()!r}"


# --------------------------------------------------------------------------- baselines


def _box_last(x, r, s):
    """Box sum over the last (contiguous) dim by cumsum, sampled every s."""
    n = x.shape[-1]
    c = F.pad(x, (r + 1, r)).cumsum(-1)
    k = (n + r + s - 1) // s
    return c[..., r::s][..., :k] - c[..., 0::s][..., :k]


def make_targets_torch_best(dots, r=R, s=1):
    """Fastest plain-PyTorch version found: int32 (float64 for float maps; exact while box sums fit int32)
    separable cumsum, each scan along a contiguous axis, only sampled rows kept."""
    x = dots.to(torch.float64 if dots.is_floating_point() else torch.int32)
    t = _box_last(x, r, s)
    t = _box_last(t.transpose(-1, -2).contiguous(), r, s).transpose(-1, -2)
    return t.to(torch.float32).contiguous()


def redundant_count_torch_best(m, r=R, s=1, cell=0):
    red = (r // s) ** 2
    if cell == 0:
        return m.sum(dim=(-2, -1), dtype=torch.float64) / red
    h, w = m.shape[-2:]
    x = F.pad(m, (0, -w % cell, 0, -h % cell))
    x = x.reshape(*x.shape[:-2], x.shape[-2] // cell, cell, x.shape[-1] // cell, cell)
    return x.sum(dim=(-3, -1), dtype=torch.float64) / red


def _dots(dtype, shape=(SIDE, SIDE)):
    g = torch.Generator().manual_seed(0)
    return ((torch.rand(shape, generator=g) < 0.002) * torch.randint(1, 3, shape, generator=g)).to(dtype)


def _first_touch(shape, dtype=torch.float32):
    """Allocating and writing a fresh output tensor once: the floor for any op
    that returns a new tensor (page faults of freshly mapped memory included)."""
    return _time(lambda: torch.empty(shape, dtype=dtype).fill_(0), rounds=5)


def _record(benchmark, key, in_pixels, bytes_moved, bw, out=None):
    s = benchmark.stats.stats.median
    base = _medians.get(key, {})
    if out is not None:
        benchmark.extra_info["output_first_touch_s"] = _first_touch(out.shape, out.dtype)
    benchmark.extra_info.update(
        seconds=s,
        mpx_per_s=in_pixels / s / 1e6,
        gbps=bytes_moved / s / 1e9,
        of_copy_bw=bytes_moved / s / bw,
        copy_bw_gbps=bw / 1e9,
        threads=torch.get_num_threads(),
        **{f"speedup_vs_{k}": v / s for k, v in base.items()},
    )


# --------------------------------------------------------------------------- make_targets

# uint8: dot images; int64: what fastcount.data loaders return; float32: pooled dots
MT_CASES = [(torch.uint8, 1), (torch.uint8, 8), (torch.int64, 1), (torch.int32, 1), (torch.float32, 1)]


@pytest.mark.parametrize("dtype,stride", MT_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_make_targets_torch_best(benchmark, dtype, stride):
    dots = _dots(dtype)
    want = ops.make_targets_reference(dots, R, stride) if (dtype, stride) == MT_CASES[0] else None
    out = benchmark.pedantic(make_targets_torch_best, (dots, R, stride), rounds=3, warmup_rounds=1)
    if want is not None:
        assert torch.equal(out, want)
    _medians.setdefault(("mt", dtype, stride), {})["torch_best"] = benchmark.stats.stats.median


@pytest.mark.parametrize("stride", [1])
def test_make_targets_reference(benchmark, stride):
    dots = _dots(torch.uint8)
    benchmark.pedantic(ops.make_targets_reference, (dots, R, stride), rounds=2, warmup_rounds=0)
    _medians.setdefault(("mt", torch.uint8, stride), {})["reference"] = benchmark.stats.stats.median


@pytest.mark.parametrize("dtype,stride", MT_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_make_targets_compiled(benchmark, copy_bandwidth, dtype, stride):
    dots = _dots(dtype)
    key = ("mt", dtype, stride)
    if "torch_best" not in _medians.get(key, {}):  # baseline deselected: time it here
        _medians.setdefault(key, {})["torch_best"] = _time(lambda: make_targets_torch_best(dots, R, stride))
    out = benchmark.pedantic(torch.ops.fastcount.make_targets, (dots, R, stride), rounds=10, warmup_rounds=2)
    assert torch.equal(out, make_targets_torch_best(dots, R, stride))
    _record(benchmark, key, dots.numel(), dots.numel() * dots.element_size() + out.numel() * 4, copy_bandwidth, out)


def test_make_targets_training_batch(benchmark):
    """A training batch as fastcount.train builds it: 4 x 256 x 256 int64 dots."""
    dots = _dots(torch.int64, (4, 256, 256))
    key = ("mt-batch",)
    _medians[key] = {"torch_best": _time(lambda: make_targets_torch_best(dots, R, 1), 10),
                     "reference": _time(lambda: ops.make_targets_reference(dots, R, 1), 10)}
    out = benchmark.pedantic(torch.ops.fastcount.make_targets, (dots, R, 1), rounds=50, warmup_rounds=5)
    assert torch.equal(out, ops.make_targets_reference(dots, R, 1))
    _record(benchmark, key, dots.numel(), dots.numel() * 8 + out.numel() * 4, 1.0)
    for k in ("gbps", "of_copy_bw", "copy_bw_gbps"):  # no bandwidth fixture here
        benchmark.extra_info.pop(k)


# --------------------------------------------------------------------------- points


@pytest.mark.parametrize("stride", [1, 8])
def test_points_compiled(benchmark, copy_bandwidth, stride):
    g = torch.Generator().manual_seed(1)
    pts = torch.randint(0, SIDE, (50_000, 2), generator=g)
    key = ("pts", stride)
    _medians[key] = {"reference": _time(lambda: ops.make_targets_from_points_reference(pts, SIDE, SIDE, R, stride), 2)}
    out = benchmark.pedantic(torch.ops.fastcount.make_targets_from_points, (pts, SIDE, SIDE, R, stride),
                             rounds=10, warmup_rounds=2)
    assert torch.equal(out, ops.make_targets_from_points_reference(pts, SIDE, SIDE, R, stride))
    _record(benchmark, key, SIDE * SIDE, pts.numel() * 8 + out.numel() * 4, copy_bandwidth, out)
    benchmark.extra_info["points"] = len(pts)


# --------------------------------------------------------------------------- redundant_count


@pytest.mark.parametrize("cell", [0, 128])
def test_redundant_count_compiled(benchmark, copy_bandwidth, cell):
    g = torch.Generator().manual_seed(2)
    m = torch.rand((1, 1, SIDE + R, SIDE + R), generator=g)
    key = ("rc", cell)
    _medians[key] = {
        "torch_best": _time(lambda: redundant_count_torch_best(m, R, 1, cell)),
        "reference": _time(lambda: ops.redundant_count_reference(m, R, 1, cell)),
    }
    out = benchmark.pedantic(torch.ops.fastcount.redundant_count, (m, R, 1, cell), rounds=10, warmup_rounds=2)
    torch.testing.assert_close(out, ops.redundant_count_reference(m, R, 1, cell), rtol=1e-12, atol=0)
    _record(benchmark, key, m.numel(), m.numel() * 4 + out.numel() * 8, copy_bandwidth)
