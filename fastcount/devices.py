"""The one rule for every ``device`` argument (count_image, count_slide, training, the CLI)."""
from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` / None -> CUDA when available, else the CPU; anything else must name a usable device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine")
    return dev
