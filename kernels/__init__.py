"""Triton kernels, installed as ``fastcount.kernels`` (one module per fused op).

- ``conv_bn_lrelu``: implicit-GEMM direct convolution, any kernel size, folded
  BN bias + LeakyReLU epilogue.
- ``inception``: both branches of an Inception block in one launch, written
  into the concatenated output.
- ``head``: the 1x1 stack (C0 -> C1 -> C2 -> 1) in one kernel, optional
  per-tile count sums.

Activations are NHWC (any strides are accepted; outputs are NHWC), weights
are pre-laid-out once as ``(k*k*CIN_P, COUT_P)`` with channel counts padded
to powers of two (>= 16, the smallest ``tl.dot`` operand) and masked in the
kernels. Accumulation is always fp32.

On a CUDA device block shapes are autotuned; under ``TRITON_INTERPRET=1``
(CPU tensors, numpy) small fixed defaults keep tests fast.
"""
from __future__ import annotations

import torch
import triton

__all__ = ["interpreting", "pad_channels", "dot_precision", "check_nhwc", "MIN_DOT"]

# tl.dot needs every operand dimension >= 16.
MIN_DOT = 16


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when this package's kernels run through Triton's CPU interpreter.

    Triton picks interpreter or compiler when a kernel is decorated, i.e. when
    fastcount.kernels is imported, so this asks the decorated object rather
    than the current environment."""
    return type(_probe).__name__ == "InterpretedFunction"


def pad_channels(c: int) -> int:
    """Channel count padded to the next power of two, at least MIN_DOT."""
    if c < 1:
        raise ValueError(f"channel count must be >= 1, got {c}")
    p = MIN_DOT
    while p < c:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """``tl.dot`` input_precision: "tf32" only for fp32 operands when allowed
    (it is ignored for bf16/fp16, but must still be a valid name)."""
    return "tf32" if (tf32 and dtype == torch.float32) else "ieee"


def check_nhwc(x: torch.Tensor, channels: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[3] != channels:
        raise ValueError(f"{name} must be an NHWC tensor (N, H, W, {channels}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{name} is on the CPU: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before import")
