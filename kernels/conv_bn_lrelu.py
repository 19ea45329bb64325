"""Conv (BN folded) + bias + LeakyReLU as an implicit-GEMM direct convolution.

GEMM view: M = output pixels (N*Ho*Wo), N = C_out, K = kh*kw*C_in. One
program owns a BLOCK_M x BLOCK_N output tile and walks K as a single flat
loop over (tap, channel block) pairs, so Triton can software-pipeline it.
Zero padding is a load mask, never a padded copy of the input. Works for any
square kernel: the 3x3 first conv (pad r) and the unpadded 14x14 / 18x18.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import check_nhwc, dot_precision, interpreting, pad_channels

__all__ = ["ConvWeights", "prepare", "conv_bn_lrelu", "output_side"]


class ConvWeights(NamedTuple):
    weight: torch.Tensor  # (k*k*cin_p, cout_p), compute dtype, zero padded
    bias: torch.Tensor  # (cout_p,) fp32
    kernel: int
    padding: int
    stride: int
    cin: int
    cout: int
    cin_p: int
    cout_p: int
    slope: float


def prepare(conv, dtype=torch.float32) -> ConvWeights:
    """Lay out a ``FoldedConv`` once for this kernel (weights in ``dtype``)."""
    cin_p, cout_p = pad_channels(conv.in_channels), pad_channels(conv.out_channels)
    return ConvWeights(
        conv.gemm_weight(cin_p, cout_p, dtype),
        conv.padded_bias(cout_p, torch.float32),
        conv.kernel,
        conv.padding,
        conv.stride,
        conv.in_channels,
        conv.out_channels,
        cin_p,
        cout_p,
        float(conv.slope),
    )


def output_side(n: int, kernel: int, padding: int, stride: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


@triton.jit
def _conv_bn_lrelu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, H, W, C_in, Ho, Wo, C_out,
    sxn, sxh, sxw, sxc,
    syn, syh, syw, syc,
    conv_stride, pad, slope,
    KH: tl.constexpr, KW: tl.constexpr, CIN_P: tl.constexpr, COUT_P: tl.constexpr,
    PREC: tl.constexpr, PADDED: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * Ho * Wo
    img = offs_m // (Ho * Wo)
    rem = offs_m - img * (Ho * Wo)
    oh = rem // Wo
    ow = rem - oh * Wo
    ih0 = oh * conv_stride - pad
    iw0 = ow * conv_stride - pad
    # Each output pixel's input at tap (0, 0); a tap then only adds a scalar
    # offset. int64: offsets in a large image or batch overflow int32.
    x_pix = x_ptr + img.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    ncb = tl.cdiv(C_in, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KH * KW * ncb):
        t = it // ncb
        cb = it - t * ncb
        kh = t // KW
        kw = t - kh * KW
        c = cb * BLOCK_K + offs_k
        if PADDED:
            ih = ih0 + kh
            iw = iw0 + kw
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        else:
            ok = m_ok  # valid conv: every tap of an output pixel lies inside the input
        if EVEN_K:
            mask = ok[:, None]
        else:
            mask = ok[:, None] & (c < C_in)[None, :]
        a = tl.load(x_pix[:, None] + (kh * sxh + kw * sxw + c * sxc)[None, :], mask=mask, other=0.0)
        # Rows past C_in are zero in the padded layout: no mask needed.
        b = tl.load(w_ptr + (t * CIN_P + c)[:, None] * COUT_P + offs_n[None, :])
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PREC)

    y = acc + tl.load(b_ptr + offs_n)[None, :]
    y = tl.where(y > 0, y, y * slope)
    y_pix = y_ptr + img.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    tl.store(
        y_pix[:, None] + offs_n[None, :] * syc,
        y.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & (offs_n < C_out)[None, :],
    )


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    cin_p, cout_p = args["CIN_P"], args["COUT_P"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= cout_p and c.kwargs["BLOCK_K"] <= cin_p]
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=2)]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): a short list (every config is a
# compile per layer shape). Wide M tiles suit the skinny GEMMs here (C_out is
# 16..64 while M is millions of pixels); pruning drops tiles wider than the
# padded channel counts.
_CONFIGS = [
    (64, 16, 32, 4, 3), (64, 32, 32, 4, 3), (64, 64, 32, 4, 3), (64, 64, 16, 4, 4),
    (128, 16, 16, 4, 4), (128, 16, 32, 4, 3), (128, 32, 32, 4, 3), (128, 32, 64, 4, 3),
    (128, 64, 16, 8, 3), (128, 64, 32, 8, 3), (128, 64, 64, 8, 3),
    (256, 16, 32, 8, 3), (256, 32, 32, 8, 3), (256, 32, 64, 8, 4),
    (64, 32, 128, 4, 4), (128, 32, 128, 4, 3),  # one channel block per tap at C_in = 128 (the 18x18 conv)
]


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in _CONFIGS
    ]


# EVEN_K depends on the tuned BLOCK_K: a heuristic under the autotuner.
_conv_bn_lrelu_heur = triton.heuristics({"EVEN_K": lambda a: a["C_in"] % a["BLOCK_K"] == 0})(_conv_bn_lrelu_kernel)


def _tuned(**autotune_kw):
    """The autotuned launcher (tests pass ``do_bench`` to drive it without a GPU)."""
    return triton.autotune(
        configs=_configs(), key=["C_in", "C_out", "Ho", "Wo", "KH", "KW", "PREC"],
        prune_configs_by={"early_config_prune": _prune}, **autotune_kw,
    )(_conv_bn_lrelu_heur)


_conv_bn_lrelu_tuned = _tuned()

# Interpreter: few, wide programs. numpy vectorises inside a program while
# every program and loop trip costs Python overhead (BLOCK_M 2048 runs a
# 14x14 conv ~10x faster than 128).
INTERPRET_BLOCKS = {"BLOCK_M": 2048, "BLOCK_N": 64, "BLOCK_K": 64}


def _interpret_blocks(m: int, cw: ConvWeights) -> dict:
    return {
        "BLOCK_M": min(INTERPRET_BLOCKS["BLOCK_M"], triton.next_power_of_2(max(m, 16))),
        "BLOCK_N": min(INTERPRET_BLOCKS["BLOCK_N"], cw.cout_p),
        "BLOCK_K": min(INTERPRET_BLOCKS["BLOCK_K"], cw.cin_p),
    }


def conv_bn_lrelu(
    x: torch.Tensor,
    cw: ConvWeights,
    *,
    stride: int | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tf32: bool = False,
    blocks: dict | None = None,
) -> torch.Tensor:
    """``leaky_relu(conv(x, w') + b')`` on an NHWC ``x`` (any strides, e.g. a
    permuted NCHW tensor). Returns NHWC ``(N, Ho, Wo, C_out)``, or writes into
    ``out`` (any strides, same shape). ``stride`` overrides the conv's own.
    ``blocks`` (BLOCK_M/N/K, num_warps...) pins a launch config instead of the
    autotuner / interpreter defaults (tests use it to force many programs).
    """
    check_nhwc(x, cw.cin)
    s = cw.stride if stride is None else int(stride)
    if s < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n, h, w, _ = x.shape
    ho, wo = output_side(h, cw.kernel, cw.padding, s), output_side(w, cw.kernel, cw.padding, s)
    if ho < 1 or wo < 1:
        raise ValueError(f"x is too small for a {cw.kernel}x{cw.kernel} conv with padding {cw.padding}: got H, W = {h}, {w}")
    if out is None:
        out = torch.empty((n, ho, wo, cw.cout), device=x.device, dtype=out_dtype or cw.weight.dtype)
    elif tuple(out.shape) != (n, ho, wo, cw.cout):
        raise ValueError(f"out must have shape {(n, ho, wo, cw.cout)}, got {tuple(out.shape)}")
    if x.device != cw.weight.device:
        raise ValueError(f"x is on {x.device} but the weights are on {cw.weight.device}")
    args = (
        x, cw.weight, cw.bias, out,
        n, h, w, cw.cin, ho, wo, cw.cout,
        *x.stride(), *out.stride(),
        s, cw.padding, cw.slope,
    )
    meta = dict(
        KH=cw.kernel, KW=cw.kernel, CIN_P=cw.cin_p, COUT_P=cw.cout_p,
        PREC=dot_precision(cw.weight.dtype, tf32), PADDED=cw.padding > 0,
    )
    m = n * ho * wo
    if m >= 2**31:  # pixel indices are int32 inside the kernel
        raise ValueError(f"x gives {m} output pixels (N*H*W); at most 2**31 - 1 per call: split the batch or tile the image")
    if blocks is not None or interpreting():
        bl = dict(blocks) if blocks is not None else _interpret_blocks(m, cw)
        if bl["BLOCK_N"] > cw.cout_p or bl["BLOCK_K"] > cw.cin_p or cw.cin_p % bl["BLOCK_K"]:
            raise ValueError(f"blocks must have BLOCK_N <= {cw.cout_p} and BLOCK_K dividing {cw.cin_p}, got {blocks}")
        grid = (triton.cdiv(m, bl["BLOCK_M"]), triton.cdiv(cw.cout, bl["BLOCK_N"]))
        _conv_bn_lrelu_heur[grid](*args, **meta, **bl)
    else:
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]), triton.cdiv(cw.cout, META["BLOCK_N"]))  # noqa: E731
        _conv_bn_lrelu_tuned[grid](*args, **meta)
    return out
