"""Count targets and the redundancy-normalised count.

Public functions validate their inputs, then run the compiled ops from
``csrc/`` when the extension is built (``torch.ops.fastcount.*``) or the
pure-PyTorch reference implementations below, which stay the tested ground
truth.

The compiled ops run on CPU tensors, and on CUDA tensors when the extension
was built with its CUDA kernels (other devices use the references). They are
exact for integer-valued dot maps; fractional float dot maps agree with the
references to float64 rounding, and CPU, CUDA and any thread count give the
same bits (a fixed summation order, see csrc/fastcount_ops.h). They have fake
kernels (torch.compile, meta tensors) and ``redundant_count`` has a gradient.
"""
from __future__ import annotations

import numpy as np
import torch

from ._ext import _C, compiled_ops_error, has_compiled_ops
from .geometry import Geometry

__all__ = [
    "make_targets",
    "make_targets_from_points",
    "redundant_count",
    "make_targets_reference",
    "make_targets_from_points_reference",
    "redundant_count_reference",
    "has_compiled_ops",
    "compiled_ops_error",
]


def _use_compiled(t: torch.Tensor) -> bool:
    """The compiled ops run on CPU tensors, and on CUDA tensors when built with CUDA."""
    if not has_compiled_ops():
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and bool(getattr(_C, "with_cuda", 0)))


def _register_fake_kernels() -> None:
    """Shape-only kernels for torch.compile / FakeTensor / meta tensors (the module the
    extension names for them). Shapes only depend on input shapes and the int
    arguments, so symbolic sizes work."""

    @torch.library.register_fake("fastcount::make_targets")
    def _make_targets_fake(dots, patch_size=32, stride=1):
        g = Geometry(patch_size, stride)
        torch._check(dots.dim() in (2, 3), lambda: f"dots must be (H, W) or (B, H, W), got {tuple(dots.shape)}")
        h, w = dots.shape[-2:]
        return dots.new_empty((*dots.shape[:-2], *g.output_size(h, w)), dtype=torch.float32)

    @torch.library.register_fake("fastcount::make_targets_from_points")
    def _points_fake(points, height, width, patch_size=32, stride=1):
        g = Geometry(patch_size, stride)
        torch._check(points.dim() == 2 and points.shape[1] == 2, lambda: "points must have shape (N, 2)")
        return points.new_empty(g.output_size(height, width), dtype=torch.float32)

    @torch.library.register_fake("fastcount::redundant_count")
    def _redundant_count_fake(count_map, patch_size=32, stride=1, cell=0):
        Geometry(patch_size, stride)
        torch._check(2 <= count_map.dim() <= 4, lambda: "count_map must be (H, W), (B, H, W) or (B, 1, H, W)")
        lead = tuple(count_map.shape[:-2])
        if cell > 0:
            h, w = count_map.shape[-2:]
            lead = (*lead, (h + cell - 1) // cell, (w + cell - 1) // cell)
        return count_map.new_empty(lead, dtype=torch.float64)

    # redundant_count is linear: d(out)/d(map) spreads each output's gradient,
    # divided by (r/s)^2, over the pixels it summed (training with a count loss).
    def _rc_setup(ctx, inputs, output):
        count_map, patch_size, stride, cell = (tuple(inputs) + (32, 1, 0)[len(inputs) - 1 :])[:4]
        ctx.shape, ctx.dtype = count_map.shape, count_map.dtype
        ctx.redundancy, ctx.cell = Geometry(patch_size, stride).redundancy, cell

    def _rc_backward(ctx, grad):
        g = grad / ctx.redundancy
        h, w = ctx.shape[-2:]
        if ctx.cell == 0:
            g = g[..., None, None].expand(ctx.shape)
        else:
            g = g.repeat_interleave(ctx.cell, dim=-2).repeat_interleave(ctx.cell, dim=-1)[..., :h, :w]
        return g.to(ctx.dtype), None, None, None

    torch.library.register_autograd("fastcount::redundant_count", _rc_backward, setup_context=_rc_setup)

    @torch.library.register_fake("fastcount::spectral_mix")
    def _spectral_mix_fake(x, k, out_channels):
        torch._check(x.dim() == 3, lambda: f"x must be (C, P, F), got {tuple(x.shape)}")
        c, p, f = x.shape
        return x.new_empty((p, out_channels, f), dtype=torch.complex64)

    @torch.library.register_fake("fastcount::gather_tiles")
    def _gather_tiles_fake(x, t, step, ny, nx):
        torch._check(x.dim() == 4, lambda: f"x must be (N, H, W, C), got {tuple(x.shape)}")
        return x.new_empty((x.shape[3], x.shape[0] * ny * nx, t, t), dtype=torch.float32)

    @torch.library.register_fake("fastcount::pointwise_mlp")
    def _pointwise_mlp_fake(x, weights, biases, slopes):
        torch._check(x.dim() == 2, lambda: f"x must be (pixels, channels), got {tuple(x.shape)}")
        return x.new_empty((x.shape[0], weights[-1].shape[0]))

    @torch.library.register_fake("fastcount::winograd_conv3x3")
    def _winograd_conv3x3_fake(x, u, bias, out_channels, slope):
        torch._check(x.dim() == 4, lambda: f"x must be (N, H, W, C), got {tuple(x.shape)}")
        return x.new_empty((*x.shape[:3], out_channels))

    @torch.library.register_fake("fastcount::crop_tiles")
    def _crop_tiles_fake(tiles, n, ny, nx, b, height, width, slope):
        torch._check(tiles.dim() == 4, lambda: f"tiles must be (P, O, t, t), got {tuple(tiles.shape)}")
        return tiles.new_empty((n, height, width, tiles.shape[1]))


if has_compiled_ops():
    _register_fake_kernels()


# --------------------------------------------------------------------------- validation


def _as_dot_tensor(dots, name: str = "dots") -> torch.Tensor:
    if isinstance(dots, np.ndarray):
        if dots.dtype == np.bool_:
            dots = dots.astype(np.uint8)
        if not (np.issubdtype(dots.dtype, np.integer) or np.issubdtype(dots.dtype, np.floating)):
            raise TypeError(f"{name} must hold integer or float counts, got dtype {dots.dtype}")
        dots = torch.from_numpy(np.ascontiguousarray(dots))
    elif not isinstance(dots, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(dots).__name__}")
    if dots.dtype == torch.bool:
        dots = dots.to(torch.uint8)
    if dots.is_complex() or not (dots.is_floating_point() or dots.dtype in _INT_DTYPES):
        raise TypeError(f"{name} must hold integer or float counts, got dtype {dots.dtype}")
    if dots.dim() not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (B, H, W), got shape {tuple(dots.shape)}")
    if dots.shape[-1] < 1 or dots.shape[-2] < 1:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(dots.shape)}")
    if dots.is_floating_point() and not bool(torch.isfinite(dots).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if dots.numel() and bool((dots < 0).any()):
        raise ValueError(f"{name} must be non-negative counts, found negative values")
    return dots


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------- references


def _box_sum_rows(x: torch.Tensor, r: int) -> torch.Tensor:
    """out[..., y, :] = sum x[..., y-r .. y-1, :] for y in 0..H+r-1 (zeros outside)."""
    h = x.shape[-2]
    c = torch.zeros((*x.shape[:-2], h + 1, x.shape[-1]), dtype=x.dtype, device=x.device)
    torch.cumsum(x, dim=-2, out=c[..., 1:, :])
    y = torch.arange(h + r, device=x.device)
    hi = y.clamp(max=h)
    lo = (y - r).clamp(min=0, max=h)
    return c[..., hi, :] - c[..., lo, :]


def make_targets_reference(dots: torch.Tensor, patch_size: int = 32, stride: int = 1) -> torch.Tensor:
    """Separable running-sum box filter, exact in int64 (float64 for float dot maps)."""
    g = Geometry(patch_size, stride)
    acc = torch.float64 if dots.is_floating_point() else torch.int64
    x = dots.to(acc)
    t = _box_sum_rows(x, g.r)
    t = _box_sum_rows(t.transpose(-1, -2), g.r).transpose(-1, -2)
    if g.stride > 1:
        t = t[..., :: g.stride, :: g.stride]
    return t.to(torch.float32).contiguous()


def _check_points(points, height, width) -> torch.Tensor:
    if isinstance(points, np.ndarray):
        points = torch.from_numpy(np.ascontiguousarray(points))
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"points must be a tensor or ndarray of shape (N, 2), got {type(points).__name__}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (row, col), got {tuple(points.shape)}")
    if points.is_floating_point():
        if not bool(torch.isfinite(points).all()) or bool((points != points.round()).any()):
            raise ValueError("points must be whole pixel coordinates (row, col)")
    elif points.dtype not in _INT_DTYPES:
        raise TypeError(f"points must be integer (row, col) coordinates, got dtype {points.dtype}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    points = points.to(torch.int64)
    if points.numel():
        bad = (points[:, 0] < 0) | (points[:, 0] >= height) | (points[:, 1] < 0) | (points[:, 1] >= width)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"points[{i}] = {tuple(points[i].tolist())} lies outside the image of shape ({height}, {width})"
            )
    return points


def make_targets_from_points_reference(points, height, width, patch_size=32, stride=1) -> torch.Tensor:
    dots = torch.zeros((height, width), dtype=torch.int64, device=points.device)
    dots.index_put_((points[:, 0], points[:, 1]), torch.ones(len(points), dtype=torch.int64), accumulate=True)
    return make_targets_reference(dots, patch_size, stride)


def redundant_count_reference(count_map: torch.Tensor, patch_size: int = 32, stride: int = 1, cell: int = 0) -> torch.Tensor:
    """``cell=0``: sum / (r/s)^2 per image. ``cell>0``: the same per ``cell x cell``
    block of the count map (last blocks may be partial), shape ``(..., ceil(H/cell), ceil(W/cell))``."""
    g = Geometry(patch_size, stride)
    x = count_map.to(torch.float64)
    if cell == 0:
        return x.sum(dim=(-2, -1)) / g.redundancy
    h, w = x.shape[-2:]
    ph, pw = -h % cell, -w % cell
    x = torch.nn.functional.pad(x, (0, pw, 0, ph))
    x = x.reshape(*x.shape[:-2], (h + ph) // cell, cell, (w + pw) // cell, cell)
    return x.sum(dim=(-3, -1)) / g.redundancy


# --------------------------------------------------------------------------- public API


def make_targets(dots, patch_size: int = 32, stride: int = 1) -> torch.Tensor:
    """Count-map targets from dot map(s).

    Args:
        dots: ``(H, W)`` or ``(B, H, W)`` tensor/ndarray of per-pixel object
            counts (bool, integer or float, non-negative).
        patch_size: window r. stride: output stride s (must divide r).

    Returns:
        float32 tensor ``(..., ceil((H+r)/s), ceil((W+r)/s))`` where
        ``T[y, x] = sum dots[y-r..y-1, x-r..x-1]`` sampled every ``s``.
    """
    Geometry(patch_size, stride)
    dots = _as_dot_tensor(dots)
    if _use_compiled(dots):
        return torch.ops.fastcount.make_targets(dots, patch_size, stride)
    return make_targets_reference(dots, patch_size, stride)


def make_targets_from_points(points, shape, patch_size: int = 32, stride: int = 1) -> torch.Tensor:
    """Targets from a point list: ``points`` (N, 2) as (row, col), ``shape`` = (H, W).

    Duplicate points count twice; points outside the image raise ValueError.
    """
    Geometry(patch_size, stride)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape must be (height, width), got {shape!r}")
    height, width = (int(s) if isinstance(s, (np.integer,)) else s for s in shape)
    points = _check_points(points, height, width)
    if _use_compiled(points):
        return torch.ops.fastcount.make_targets_from_points(points, height, width, patch_size, stride)
    return make_targets_from_points_reference(points, height, width, patch_size, stride)


def redundant_count(count_map, patch_size: int = 32, stride: int = 1, cell: int = 0) -> torch.Tensor:
    """Object count from a redundant count map: ``sum / (r/s)^2`` in float64.

    Args:
        count_map: ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)`` tensor/ndarray.

    Returns:
        float64 tensor of the leading shape: 0-d for ``(H, W)``, ``(B,)`` or
        ``(B, 1)`` otherwise. With ``cell > 0``: counts per ``cell x cell``
        block of the count map (a low-resolution density that adds up to the
        whole), shape ``(..., ceil(H/cell), ceil(W/cell))``.
    """
    Geometry(patch_size, stride)
    if isinstance(count_map, np.ndarray):
        count_map = torch.from_numpy(np.ascontiguousarray(count_map))
    if not isinstance(count_map, torch.Tensor):
        raise TypeError(f"count_map must be a torch.Tensor or numpy.ndarray, got {type(count_map).__name__}")
    if count_map.dim() < 2 or count_map.dim() > 4:
        raise ValueError(f"count_map must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(count_map.shape)}")
    if count_map.dtype == torch.bool or count_map.is_complex():
        raise TypeError(f"count_map must be a real numeric tensor, got dtype {count_map.dtype}")
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 0:
        raise ValueError(f"cell must be a non-negative int (0 = one count per image), got {cell!r}")
    if _use_compiled(count_map) and count_map.dtype in _COUNT_MAP_OP_DTYPES:
        return torch.ops.fastcount.redundant_count(count_map, patch_size, stride, cell)
    return redundant_count_reference(count_map, patch_size, stride, cell)


# dtypes the compiled redundant_count takes (others, e.g. uint16, use the reference)
_COUNT_MAP_OP_DTYPES = (*_INT_DTYPES, torch.float16, torch.bfloat16, torch.float32, torch.float64)
