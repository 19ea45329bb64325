"""Inception block (1x1 branch + 3x3 pad-1 branch, BN folded, LeakyReLU) in one launch.

One program owns BLOCK_M output pixels and *all* output channels of both
branches. It walks the input channel blocks; for each it loads the 9 shifted
input tiles of the 3x3 stencil, and the centre tile (the 1x1 branch's input)
feeds both GEMMs, so the input is read once for both branches. The epilogue
writes channels [0, A) and [A, A+B) of the concatenated output directly: no
torch.cat, no intermediate tensors.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import check_nhwc, dot_precision, interpreting, pad_channels

__all__ = ["InceptionWeights", "prepare", "inception"]


class InceptionWeights(NamedTuple):
    w1: torch.Tensor  # (cin_p, a_p)
    b1: torch.Tensor  # (a_p,) fp32
    w3: torch.Tensor  # (9*cin_p, b_p)
    b3: torch.Tensor  # (b_p,) fp32
    cin: int
    a: int
    b: int
    cin_p: int
    a_p: int
    b_p: int
    slope1: float
    slope3: float

    @property
    def cout(self) -> int:
        return self.a + self.b


def prepare(block, dtype=torch.float32) -> InceptionWeights:
    """Lay out a ``FoldedInception`` once for this kernel (weights in ``dtype``)."""
    b1, b3 = block.branch1, block.branch3
    if b1.kernel != 1 or b1.padding != 0 or b3.kernel != 3 or b3.padding != 1 or b1.stride != 1 or b3.stride != 1:
        raise ValueError("block must be a 1x1 (pad 0) + 3x3 (pad 1) Inception with stride 1")
    if b1.in_channels != b3.in_channels:
        raise ValueError(f"block branches disagree on input channels: {b1.in_channels} vs {b3.in_channels}")
    cin_p, a_p, b_p = pad_channels(b1.in_channels), pad_channels(b1.out_channels), pad_channels(b3.out_channels)
    return InceptionWeights(
        b1.gemm_weight(cin_p, a_p, dtype),
        b1.padded_bias(a_p, torch.float32),
        b3.gemm_weight(cin_p, b_p, dtype),
        b3.padded_bias(b_p, torch.float32),
        b1.in_channels,
        b1.out_channels,
        b3.out_channels,
        cin_p,
        a_p,
        b_p,
        float(b1.slope),
        float(b3.slope),
    )


@triton.jit
def _inception_kernel(
    x_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr, y_ptr,
    N, H, W, C_in, A, B,
    sxn, sxh, sxw, sxc,
    syn, syh, syw, syc,
    slope1, slope3,
    CIN_P: tl.constexpr, A_P: tl.constexpr, B_P: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * H * W
    img = offs_m // (H * W)
    rem = offs_m - img * (H * W)
    oh = rem // W
    ow = rem - oh * W
    # Input of each output pixel at the centre tap; taps add scalar offsets.
    # int64: offsets in a large image or batch overflow int32.
    x_pix = x_ptr + img.to(tl.int64) * sxn + oh.to(tl.int64) * sxh + ow.to(tl.int64) * sxw

    offs_a = tl.arange(0, A_P)
    offs_b = tl.arange(0, B_P)
    offs_k = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_M, A_P), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, B_P), dtype=tl.float32)
    for cb in range(0, tl.cdiv(C_in, BLOCK_K)):
        c = cb * BLOCK_K + offs_k
        c_ok = (c < C_in)[None, :]
        for t in tl.static_range(9):
            ih = oh + (t // 3 - 1)
            iw = ow + (t % 3 - 1)
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(
                x_pix[:, None] + ((t // 3 - 1) * sxh + (t % 3 - 1) * sxw + c * sxc)[None, :],
                mask=ok[:, None] & c_ok,
                other=0.0,
            )
            w3 = tl.load(w3_ptr + (t * CIN_P + c)[:, None] * B_P + offs_b[None, :])
            a = a.to(w3.dtype)
            acc3 = tl.dot(a, w3, acc3, input_precision=PREC)
            if t == 4:  # centre tap == the 1x1 branch's input tile
                w1 = tl.load(w1_ptr + c[:, None] * A_P + offs_a[None, :])
                acc1 = tl.dot(a, w1, acc1, input_precision=PREC)

    y_pix = y_ptr + img.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    y1 = acc1 + tl.load(b1_ptr + offs_a)[None, :]
    y1 = tl.where(y1 > 0, y1, y1 * slope1)
    tl.store(
        y_pix[:, None] + offs_a[None, :] * syc,
        y1.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & (offs_a < A)[None, :],
    )
    y3 = acc3 + tl.load(b3_ptr + offs_b)[None, :]
    y3 = tl.where(y3 > 0, y3, y3 * slope3)
    tl.store(
        y_pix[:, None] + (A + offs_b)[None, :] * syc,
        y3.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & (offs_b < B)[None, :],
    )


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    width = args["A_P"] + args["B_P"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_K"] <= args["CIN_P"] and c.kwargs["BLOCK_M"] * width <= 128 * 256  # accumulators fit registers
    ]
    return kept or [triton.Config({"BLOCK_M": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2)]


# (BLOCK_M, BLOCK_K, warps, stages): each program holds BLOCK_M x (A_P + B_P)
# fp32 accumulators, so M tiles stay moderate; a short list keeps compile time down.
_CONFIGS = [
    (32, 16, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2), (64, 32, 4, 3),
    (64, 32, 8, 2), (128, 16, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3),
]


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bm, bk, w, st in _CONFIGS]


def _tuned(**autotune_kw):
    """The autotuned launcher (tests pass ``do_bench`` to drive it without a GPU)."""
    return triton.autotune(
        configs=_configs(), key=["C_in", "A", "B", "H", "W", "PREC"],
        prune_configs_by={"early_config_prune": _prune}, **autotune_kw,
    )(_inception_kernel)


_inception_tuned = _tuned()

# Interpreter: few, wide programs (Python overhead per program and loop trip).
INTERPRET_BLOCKS = {"BLOCK_M": 2048, "BLOCK_K": 64}


def inception(
    x: torch.Tensor,
    iw: InceptionWeights,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tf32: bool = False,
    blocks: dict | None = None,
) -> torch.Tensor:
    """Both branches of an Inception block on NHWC ``x`` (any strides) ->
    NHWC ``(N, H, W, A+B)``, 1x1 channels first (or written into ``out``).
    ``blocks`` (BLOCK_M/K, ...) pins a launch config (tests force many programs)."""
    check_nhwc(x, iw.cin)
    if x.device != iw.w1.device:
        raise ValueError(f"x is on {x.device} but the weights are on {iw.w1.device}")
    n, h, w, _ = x.shape
    if out is None:
        out = torch.empty((n, h, w, iw.cout), device=x.device, dtype=out_dtype or iw.w1.dtype)
    elif tuple(out.shape) != (n, h, w, iw.cout):
        raise ValueError(f"out must have shape {(n, h, w, iw.cout)}, got {tuple(out.shape)}")
    args = (
        x, iw.w1, iw.b1, iw.w3, iw.b3, out,
        n, h, w, iw.cin, iw.a, iw.b,
        *x.stride(), *out.stride(),
        iw.slope1, iw.slope3,
    )
    meta = dict(CIN_P=iw.cin_p, A_P=iw.a_p, B_P=iw.b_p, PREC=dot_precision(iw.w1.dtype, tf32))
    m = n * h * w
    if m >= 2**31:  # pixel indices are int32 inside the kernel
        raise ValueError(f"x gives {m} output pixels (N*H*W); at most 2**31 - 1 per call: split the batch or tile the image")
    if blocks is not None or interpreting():
        if blocks is not None:
            bl = dict(blocks)
        else:
            bl = {"BLOCK_M": min(INTERPRET_BLOCKS["BLOCK_M"], triton.next_power_of_2(max(m, 16))),
                  "BLOCK_K": min(INTERPRET_BLOCKS["BLOCK_K"], iw.cin_p)}
        if bl["BLOCK_K"] > iw.cin_p or iw.cin_p % bl["BLOCK_K"]:
            raise ValueError(f"blocks must have BLOCK_K dividing {iw.cin_p}, got {blocks}")
        _inception_kernel[(triton.cdiv(m, bl["BLOCK_M"]),)](*args, **meta, **bl)
    else:
        _inception_tuned[lambda META: (triton.cdiv(m, META["BLOCK_M"]),)](*args, **meta)
    return out
