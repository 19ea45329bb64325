"""Helpers shared by the test suite and the benchmarks (not needed at run time)."""
from __future__ import annotations

import torch

__all__ = ["randomize_bn"]


def randomize_bn(model, seed=0):
    """Give every BatchNorm random affine parameters and running statistics, so
    folding and fused epilogues are tested on non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 5)
                m.running_var.copy_(0.5 + 20 * torch.rand(n, generator=g))
    return model
