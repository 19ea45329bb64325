"""What an inference backend is: a name, its precisions, where it runs, and how it is built.

Each backend module (``eager``, ``cpu``, ``triton``) declares one :class:`Backend`;
:mod:`fastcount.inference` keeps them in a registry, from which ``compile``, the
"auto" choice and the CLI's ``--backend`` choices all read. A built backend is a
callable with the contract of ``model(x)`` and a ``name`` attribute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Backend", "check_input"]


@dataclass(frozen=True)
class Backend:
    """One inference backend.

    ``build(model, precision=..., device=..., **options)`` returns the callable;
    ``is_available(device)`` says whether it can run on a ``torch.device`` in this
    installation; ``auto_devices`` are the device types on which ``backend="auto"``
    picks it (the reference backend is the fallback everywhere else).
    """

    name: str
    precisions: tuple
    is_available: Callable[[torch.device], bool]
    build: Callable[..., Callable]
    auto_devices: tuple = ()


def check_input(x, in_channels: int, device: torch.device, backend: str) -> None:
    """The input checks every compiled backend shares: an (N, C, H, W) floating tensor,
    non-empty, on the backend's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must be an (N, {in_channels}, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (a floating-point dtype) of 0..255 intensities, got {x.dtype}")
    dev = x.device
    if dev.type != device.type or (dev.type == "cuda" and dev.index != device.index):
        raise ValueError(f"x must be on {device} (where the {backend} backend's weights are), got {dev}")
    if min(x.shape) < 1:
        raise ValueError(f"x must have a non-empty batch and spatial size, got shape {tuple(x.shape)}")
