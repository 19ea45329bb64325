"""CountCeption: the reference, trainable network (SPEC §2).

Inputs are NCHW float tensors of raw 0..255 intensities (no normalisation, as
in the reference implementation). The output is the redundant count map,
``(N, 1, ceil((H+r)/s), ceil((W+r)/s))``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .geometry import Geometry

__all__ = ["CountCeption", "ConvBNAct", "Inception", "LEAKY_SLOPE", "BN_EPS"]

LEAKY_SLOPE = 0.01
BN_EPS = 1e-5

# (kind, a, b, kernel) for the layer table; for "inception" a/b are the 1x1 / 3x3 filters.
# "large1"/"large2" are the two valid convs whose kernels come from the geometry.
LAYERS = (
    ("conv", 64, None, "first"),
    ("inception", 16, 16, None),
    ("inception", 16, 32, None),
    ("conv", 16, None, "large1"),
    ("inception", 112, 48, None),
    ("inception", 64, 32, None),
    ("inception", 40, 40, None),
    ("inception", 32, 96, None),
    ("conv", 32, None, "large2"),
    ("conv", 64, None, 1),
    ("conv", 64, None, 1),
)


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class ConvBNAct(nn.Sequential):
    """Conv2d (with bias) -> BatchNorm2d -> LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=True),
            nn.BatchNorm2d(cout, eps=BN_EPS),
            nn.LeakyReLU(LEAKY_SLOPE),
        )

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]


class Inception(nn.Module):
    """1x1 branch (pad 0) and 3x3 branch (pad 1) on one input, concatenated 1x1-first."""

    def __init__(self, cin: int, a: int, b: int):
        super().__init__()
        self.branch1 = ConvBNAct(cin, a, 1, 0)
        self.branch3 = ConvBNAct(cin, b, 3, 1)

    @property
    def out_channels(self) -> int:
        return self.branch1.conv.out_channels + self.branch3.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x)], dim=1)


class CountCeption(nn.Module):
    """Count-ception (Cohen et al. 2017).

    Args:
        in_channels: image channels (3 for RGB).
        patch_size: receptive-field window r (32 in the paper).
        stride: output stride s of the final 1x1 conv; must divide r.
        width: multiplies every conv's filter count (rounded, at least 1);
            geometry is unchanged, so tiny models keep the real receptive field.

    ``bf16_rounding``: calibrated bf16 values for the folded weights
    (:func:`fastcount.inference.calibrate_bf16`), or None. ``save_model`` stores
    them, ``load_model`` restores them, the cpu backend's bf16 uses them.
    """

    bf16_rounding = None

    def __init__(self, in_channels: int = 3, patch_size: int = 32, stride: int = 1, width: float = 1.0):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(width, (int, float)) or isinstance(width, bool) or not math.isfinite(width) or width <= 0:
            raise ValueError(f"width must be a positive finite number, got {width!r}")
        self.geometry = Geometry(patch_size, stride)
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.stride = stride
        self.width = float(width)
        k_first, k_large1, k_large2 = self.geometry.kernels

        layers = []
        cin = in_channels
        for kind, a, b, kernel in LAYERS:
            if kind == "inception":
                block = Inception(cin, _scaled(a, width), _scaled(b, width))
                cin = block.out_channels
            else:
                k, pad = {"first": (k_first, patch_size), "large1": (k_large1, 0), "large2": (k_large2, 0)}.get(
                    kernel, (kernel, 0)
                )
                block = ConvBNAct(cin, _scaled(a, width), k, pad)
                cin = _scaled(a, width)
            layers.append(block)
        layers.append(ConvBNAct(cin, 1, 1, 0, stride=stride))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    @property
    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "stride": self.stride,
            "width": self.width,
        }

    def conv_blocks(self):
        """Every ConvBNAct in forward order (Inception: 1x1 branch, then 3x3)."""
        return [m for m in self.modules() if isinstance(m, ConvBNAct)]

    def reset_parameters(self) -> None:
        gain = nn.init.calculate_gain("leaky_relu", LEAKY_SLOPE)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=gain)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be an (N, {self.in_channels}, H, W) tensor, got shape {tuple(x.shape)}"
            )
        return self.layers(x)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
