"""The 1x1 head (C0 -> C1 -> C2 -> 1, each BN folded + LeakyReLU) in one kernel.

One program owns BLOCK_M output pixels of one image: it reads their C0
channels once, keeps the C1- and C2-wide intermediates in registers (two
tl.dot), reduces the last layer (one output channel) as a row dot product,
and writes the count map. With EMIT_SUMS it also writes the sum of its
pixels' counts, so a caller gets per-image totals without re-reading the
map. The last conv's output stride s is handled by sampling input pixels
(s*i, s*j): 1x1 convs commute with subsampling.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import check_nhwc, dot_precision, interpreting, pad_channels

__all__ = ["HeadWeights", "prepare", "head"]


class HeadWeights(NamedTuple):
    w1: torch.Tensor  # (c0_p, c1_p)
    b1: torch.Tensor  # (c1_p,) fp32
    w2: torch.Tensor  # (c1_p, c2_p)
    b2: torch.Tensor  # (c2_p,) fp32
    w3: torch.Tensor  # (c2_p,) fp32: a row dot, not a tensor-core GEMM
    b3: torch.Tensor  # (1,) fp32
    c0: int
    c0_p: int
    c1_p: int
    c2_p: int
    stride: int
    slopes: tuple


def prepare(convs, dtype=torch.float32) -> HeadWeights:
    """Lay out three ``FoldedConv`` 1x1 layers (the last with one output
    channel; only the last may have a stride) once for this kernel."""
    if len(convs) != 3:
        raise ValueError(f"convs must be the three 1x1 head layers, got {len(convs)}")
    c1, c2, c3 = convs
    for i, c in enumerate(convs):
        if c.kernel != 1 or c.padding != 0:
            raise ValueError(f"convs[{i}] must be a 1x1 conv with padding 0, got kernel {c.kernel}, padding {c.padding}")
    if c1.stride != 1 or c2.stride != 1:
        raise ValueError("only the last head conv may have a stride")
    if c3.out_channels != 1:
        raise ValueError(f"the last head conv must have 1 output channel, got {c3.out_channels}")
    if c2.in_channels != c1.out_channels or c3.in_channels != c2.out_channels:
        raise ValueError("head convs do not chain: channel counts disagree")
    c0_p, c1_p, c2_p = pad_channels(c1.in_channels), pad_channels(c1.out_channels), pad_channels(c2.out_channels)
    return HeadWeights(
        c1.gemm_weight(c0_p, c1_p, dtype),
        c1.padded_bias(c1_p, torch.float32),
        c2.gemm_weight(c1_p, c2_p, dtype),
        c2.padded_bias(c2_p, torch.float32),
        c3.gemm_weight(c2_p, 1, torch.float32).reshape(c2_p),
        c3.bias.to(torch.float32).reshape(1).contiguous(),
        c1.in_channels,
        c0_p,
        c1_p,
        c2_p,
        c3.stride,
        (float(c1.slope), float(c2.slope), float(c3.slope)),
    )


@triton.jit
def _head_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, y_ptr, sums_ptr,
    C0, Ho, Wo, out_stride,
    sxn, sxh, sxw, sxc,
    syn, syh, syw,
    slope1, slope2, slope3,
    C0_P: tl.constexpr, C1_P: tl.constexpr, C2_P: tl.constexpr,
    PREC: tl.constexpr, EMIT_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    img = tl.program_id(1)  # programs never straddle images: per-tile sums stay per image
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Ho * Wo
    oh = offs_m // Wo
    ow = offs_m - oh * Wo
    c0 = tl.arange(0, C0_P)
    c1 = tl.arange(0, C1_P)
    c2 = tl.arange(0, C2_P)

    # int64: offsets in a large image overflow int32.
    x_pix = x_ptr + img.to(tl.int64) * sxn + (oh * out_stride).to(tl.int64) * sxh + (ow * out_stride).to(tl.int64) * sxw
    x = tl.load(
        x_pix[:, None] + c0[None, :] * sxc,
        mask=m_ok[:, None] & (c0 < C0)[None, :],
        other=0.0,
    )
    w1 = tl.load(w1_ptr + c0[:, None] * C1_P + c1[None, :])
    h1 = tl.dot(x.to(w1.dtype), w1, input_precision=PREC) + tl.load(b1_ptr + c1)[None, :]
    h1 = tl.where(h1 > 0, h1, h1 * slope1)
    w2 = tl.load(w2_ptr + c1[:, None] * C2_P + c2[None, :])
    # Padded channels are exactly 0 (zero weights, zero bias): no mask needed.
    h2 = tl.dot(h1.to(w2.dtype), w2, input_precision=PREC) + tl.load(b2_ptr + c2)[None, :]
    h2 = tl.where(h2 > 0, h2, h2 * slope2)
    y = tl.sum(h2 * tl.load(w3_ptr + c2)[None, :], axis=1) + tl.load(b3_ptr)
    y = tl.where(y > 0, y, y * slope3)
    tl.store(y_ptr + img.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw, y, mask=m_ok)
    if EMIT_SUMS:
        tl.store(sums_ptr + img * tl.num_programs(0) + pid_m, tl.sum(tl.where(m_ok, y, 0.0), axis=0))


def _configs():
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=1)
        for bm in (32, 64, 128, 256)
        for warps in (4, 8)
    ]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    width = args["C1_P"] + args["C2_P"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * width <= 256 * 128]
    return kept or [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]


def _tuned(**autotune_kw):
    """The autotuned launcher (tests pass ``do_bench`` to drive it without a GPU)."""
    return triton.autotune(
        configs=_configs(), key=["C0", "Ho", "Wo", "C1_P", "C2_P", "PREC"],
        prune_configs_by={"early_config_prune": _prune}, **autotune_kw,
    )(_head_kernel)


_head_tuned = _tuned()

INTERPRET_BLOCK_M = 2048  # interpreter: few, wide programs
_TUNED: dict = {}  # shape key -> launch config chosen by the autotuner


def head(
    x: torch.Tensor,
    hw: HeadWeights,
    *,
    stride: int | None = None,
    out: torch.Tensor | None = None,
    emit_sums: bool = False,
    tf32: bool = False,
    blocks: dict | None = None,
):
    """Head on NHWC ``x`` (N, H, W, C0) -> count map ``(N, 1, Ho, Wo)`` fp32,
    ``Ho = ceil(H / s)`` (or written into ``out``). With ``emit_sums`` returns
    ``(map, sums)`` where ``sums`` is ``(N, tiles)`` fp32 partial sums of the
    map (sum them in float64 for the image total). ``blocks`` ({"BLOCK_M": ..})
    pins a launch config (tests force many tiles)."""
    check_nhwc(x, hw.c0)
    if x.device != hw.w1.device:
        raise ValueError(f"x is on {x.device} but the weights are on {hw.w1.device}")
    s = hw.stride if stride is None else int(stride)
    if s < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n, h, w, _ = x.shape
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    if out is None:
        out = torch.empty((n, 1, ho, wo), device=x.device, dtype=torch.float32)
    elif tuple(out.shape) != (n, 1, ho, wo) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {(n, 1, ho, wo)}, got {out.dtype} {tuple(out.shape)}")
    prec = dot_precision(hw.w1.dtype, tf32)
    meta = dict(C0_P=hw.c0_p, C1_P=hw.c1_p, C2_P=hw.c2_p, PREC=prec)

    def args(sums):
        return (
            x, hw.w1, hw.b1, hw.w2, hw.b2, hw.w3, hw.b3, out, sums,
            hw.c0, ho, wo, s,
            *x.stride(),
            out.stride(0), out.stride(2), out.stride(3),
            *hw.slopes,
        )

    if blocks is not None:
        cfg = dict(blocks)
    elif interpreting():
        cfg = {"BLOCK_M": min(INTERPRET_BLOCK_M, triton.next_power_of_2(max(ho * wo, 16)))}
    else:
        key = (hw.c0, ho, wo, hw.c1_p, hw.c2_p, prec, x.dtype, x.device)
        cfg = _TUNED.get(key)
        if cfg is None:
            # Tune on the map only (its grid depends on BLOCK_M, so the sums
            # buffer is sized afterwards from the winner); later calls launch once.
            _head_tuned[lambda META: (triton.cdiv(ho * wo, META["BLOCK_M"]), n)](*args(out), **meta, EMIT_SUMS=False)
            best = _head_tuned.best_config
            cfg = _TUNED[key] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    tiles = triton.cdiv(ho * wo, cfg["BLOCK_M"])
    sums = torch.empty((n, tiles), device=x.device, dtype=torch.float32) if emit_sums else out
    _head_kernel[(tiles, n)](*args(sums), **meta, EMIT_SUMS=emit_sums, **cfg)
    return (out, sums) if emit_sums else out
