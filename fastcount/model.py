"""CountCeption: the reference, trainable network.

Inputs are NCHW float tensors of raw 0..255 intensities (no normalisation, as
in the reference implementation). The output is the redundant count map,
``(N, 1, ceil((H+r)/s), ceil((W+r)/s))``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .geometry import Geometry

__all__ = ["CountCeption", "ConvBNAct", "Inception", "LEAKY_SLOPE", "BN_EPS", "ROLES", "FIRST", "INCEPTION", "LARGE", "HEAD"]

LEAKY_SLOPE = 0.01
BN_EPS = 1e-5

# What each entry of CountCeption.layers is. fold() carries these roles into the
# inference plan, and the backends, the bf16 rounding and FFT training read them.
FIRST = "first"  # the 3x3 conv, zero-padded by r
INCEPTION = "inception"  # 1x1 and 3x3 branches (pad 0 / 1), concatenated
LARGE = "large"  # a large valid conv; its kernel comes from the geometry
HEAD = "head"  # the trailing 1x1 convs; the last has one output channel and the stride

# (role, a, b): output channels at width 1 (for an Inception block a/b are the 1x1 / 3x3
# branches). The final 1x1 conv to one channel follows.
LAYERS = (
    (FIRST, 64, None),
    (INCEPTION, 16, 16),
    (INCEPTION, 16, 32),
    (LARGE, 16, None),
    (INCEPTION, 112, 48),
    (INCEPTION, 64, 32),
    (INCEPTION, 40, 40),
    (INCEPTION, 32, 96),
    (LARGE, 32, None),
    (HEAD, 64, None),
    (HEAD, 64, None),
)
ROLES = tuple(role for role, _, _ in LAYERS) + (HEAD,)


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
    def out_channels(self) -> int:
        return self.conv.out_channels

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
        k_first, *k_large = self.geometry.kernels
        k_large = iter(k_large)

        layers = []
        cin = in_channels
        for role, a, b in LAYERS:
            if role == INCEPTION:
                block = Inception(cin, _scaled(a, width), _scaled(b, width))
            elif role == FIRST:
                block = ConvBNAct(cin, _scaled(a, width), k_first, self.geometry.first_pad)
            elif role == LARGE:
                block = ConvBNAct(cin, _scaled(a, width), next(k_large), 0)
            else:
                block = ConvBNAct(cin, _scaled(a, width), 1, 0)
            cin = block.out_channels
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

    @property
    def roles(self) -> tuple:
        """The role of each entry of ``self.layers`` (FIRST, INCEPTION, LARGE or HEAD)."""
        return ROLES

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
