"""The reference backend: the nn.Module itself, in eval mode."""
from __future__ import annotations

import torch

from ..model import CountCeption
from .backend import Backend

__all__ = ["EagerBackend", "build", "BACKEND"]

PRECISIONS = ("fp32", "bf16", "fp16")


class EagerBackend:
    """The reference: the nn.Module in eval mode under inference_mode (autocast for bf16/fp16)."""

    name = "eager"

    def __init__(self, model: CountCeption, precision: str = "fp32"):
        self.model = model.eval()
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp32":
            return self.model(x)
        dt = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(x.device.type, dtype=dt):
            return self.model(x).float()


def build(model: CountCeption, precision: str = "fp32", device=None, **options) -> EagerBackend:
    if options:
        raise TypeError(f"backend 'eager' takes no options, got {sorted(options)}")
    return EagerBackend(model, precision)


BACKEND = Backend("eager", PRECISIONS, is_available=lambda device: True, build=build)
