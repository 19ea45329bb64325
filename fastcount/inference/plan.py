"""Fold an eval-mode CountCeption into an immutable inference plan.

Every ConvBNAct becomes one conv with bias and a LeakyReLU epilogue:
``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``.
Each folded layer keeps the role the model gives it (``fastcount.model.ROLES``:
first conv, Inception block, large valid conv, head), so backends ask the plan
what a layer is instead of guessing from its shape. Backends consume the plan,
never the nn.Module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import Geometry
from ..model import HEAD, LEAKY_SLOPE, ROLES, ConvBNAct, CountCeption, Inception

__all__ = ["FoldedConv", "FoldedInception", "Plan", "fold", "fold_conv"]


@dataclass(frozen=True)
class FoldedConv:
    weight: torch.Tensor  # (C_out, C_in, k, k), BN folded in
    bias: torch.Tensor  # (C_out,)
    kernel: int
    padding: int
    stride: int = 1
    slope: float = LEAKY_SLOPE

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def gemm_weight(self, cin_pad: int | None = None, cout_pad: int | None = None, dtype=None) -> torch.Tensor:
        """Weight laid out for NHWC implicit GEMM: ``(k*k*cin_pad, cout_pad)``,
        row ``(kh*k + kw)*cin_pad + c``, zero in the padded rows/columns (so
        kernels may read a whole padded block without masks)."""
        cin, cout, k = self.in_channels, self.out_channels, self.kernel
        cin_pad = cin if cin_pad is None else cin_pad
        cout_pad = cout if cout_pad is None else cout_pad
        if cin_pad < cin or cout_pad < cout:
            raise ValueError(f"cin_pad/cout_pad must be >= ({cin}, {cout}), got ({cin_pad}, {cout_pad})")
        out = self.weight.new_zeros((k, k, cin_pad, cout_pad), dtype=dtype or self.weight.dtype)
        out[:, :, :cin, :cout] = self.weight.permute(2, 3, 1, 0)
        return out.reshape(k * k * cin_pad, cout_pad).contiguous()

    def padded_bias(self, cout_pad: int | None = None, dtype=None) -> torch.Tensor:
        """Bias zero-padded to ``cout_pad`` entries."""
        cout = self.out_channels
        cout_pad = cout if cout_pad is None else cout_pad
        if cout_pad < cout:
            raise ValueError(f"cout_pad must be >= {cout}, got {cout_pad}")
        out = self.bias.new_zeros((cout_pad,), dtype=dtype or self.bias.dtype)
        out[:cout] = self.bias
        return out

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain PyTorch conv + bias + LeakyReLU (NCHW)."""
        y = torch.nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding)
        return torch.nn.functional.leaky_relu(y, self.slope)


@dataclass(frozen=True)
class FoldedInception:
    branch1: FoldedConv  # 1x1, pad 0
    branch3: FoldedConv  # 3x3, pad 1

    @property
    def out_channels(self) -> int:
        return self.branch1.out_channels + self.branch3.out_channels

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1.reference(x), self.branch3.reference(x)], dim=1)


@dataclass(frozen=True)
class Plan:
    """Folded layers in forward order (FoldedConv or FoldedInception), each with its role."""

    layers: tuple
    geometry: Geometry
    in_channels: int
    roles: tuple = ROLES  # roles[i]: what layers[i] is (fastcount.model.FIRST, INCEPTION, LARGE, HEAD)

    def __post_init__(self):
        if len(self.roles) != len(self.layers):
            raise ValueError(f"a plan needs one role per layer, got {len(self.roles)} roles for {len(self.layers)} layers")

    def with_roles(self):
        """``(role, layer)`` pairs in forward order."""
        return zip(self.roles, self.layers)

    def split_head(self) -> tuple[list, list]:
        """``(body, head)``: the layers before the trailing head convs, and those convs."""
        n_body = len(self.roles)
        while n_body and self.roles[n_body - 1] == HEAD:
            n_body -= 1
        return list(self.layers[:n_body]), list(self.layers[n_body:])

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.reference(x)
        return x

    def to(self, device=None, dtype=None) -> "Plan":
        def mv(c: FoldedConv):
            return FoldedConv(c.weight.to(device, dtype), c.bias.to(device, dtype), c.kernel, c.padding, c.stride, c.slope)

        layers = tuple(
            FoldedInception(mv(l.branch1), mv(l.branch3)) if isinstance(l, FoldedInception) else mv(l) for l in self.layers
        )
        return Plan(layers, self.geometry, self.in_channels, self.roles)


@torch.no_grad()
def fold_conv(block: ConvBNAct, dtype=torch.float64) -> FoldedConv:
    conv, bn = block.conv, block.bn
    scale = bn.weight.to(dtype) / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
    w = conv.weight.to(dtype) * scale[:, None, None, None]
    b = (conv.bias.to(dtype) - bn.running_mean.to(dtype)) * scale + bn.bias.to(dtype)
    slope = block[2].negative_slope
    return FoldedConv(w.contiguous(), b.contiguous(), conv.kernel_size[0], conv.padding[0], conv.stride[0], slope)


@torch.no_grad()
def fold(model: CountCeption, dtype=torch.float32) -> Plan:
    """Fold BN into every conv (computed in float64, stored as ``dtype``)."""
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, got {type(model).__name__}")
    layers = []
    for m in model.layers:
        if isinstance(m, Inception):
            layers.append(FoldedInception(fold_conv(m.branch1), fold_conv(m.branch3)))
        else:
            layers.append(fold_conv(m))
    plan = Plan(tuple(layers), model.geometry, model.in_channels, model.roles)
    device = next(model.parameters()).device
    return plan.to(device, dtype)
