"""3x3 convs by Winograd F(4x4, 3x3) on the CPU (the compiled ``fastcount::winograd_conv3x3`` op).

Each 4x4 output tile costs 36 multiply-adds per channel pair instead of 144; the
weights are transformed once here (``U = G w G^T``, in float64, then float32). The
transforms' coefficients (up to 8 and 1/24) cost some accuracy: measured max error
relative to the largest output ~1e-6 on random weights and inputs (tests/test_winograd.py
holds it under 1e-5).
"""
from __future__ import annotations

import torch

__all__ = ["transform_weights", "WinogradConv", "OUT_PAD"]

OUT_PAD = 16  # out channels of u and bias are zero-padded to a multiple of this (csrc/cpu/winograd_cpu.cpp)

# G of F(4x4, 3x3) (interpolation points 0, +-1, +-2, infinity), as in csrc/cpu/winograd_cpu.cpp's B^T and A^T.
_G = torch.tensor([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=torch.float64)


def transform_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, C, 3, 3) weights, (O,) bias -> u (36, C, Opad) float32 and bias (Opad,) float32."""
    o, c, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"weight must be (O, C, 3, 3), got {tuple(weight.shape)}")
    opad = -(-o // OUT_PAD) * OUT_PAD
    u = torch.einsum("ai,ocij,bj->abco", _G, weight.double(), _G).reshape(36, c, o)
    up = torch.zeros(36, c, opad, dtype=torch.float64)
    up[:, :, :o] = u
    bp = torch.zeros(opad, dtype=torch.float64)
    bp[:o] = bias.double()
    return up.float().contiguous(), bp.float()


class WinogradConv:
    """A folded 3x3 conv (pad 1) + bias + LeakyReLU on channels_last float32 tensors."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, slope: float):
        self.out_channels = weight.shape[0]
        self.u, self.bias = transform_weights(weight, bias)
        self.slope = float(slope)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) channels_last in -> (N, O, H, W) channels_last out."""
        y = torch.ops.fastcount.winograd_conv3x3(x.permute(0, 2, 3, 1), self.u, self.bias, self.out_channels,
                                                 self.slope)
        return y.permute(0, 3, 1, 2)
