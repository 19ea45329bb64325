"""One-image counting: ``count_image``."""
from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch

from .io import load_model
from .model import CountCeption
from .ops import redundant_count

__all__ = ["count_image", "image_to_tensor", "resolve_model"]


def resolve_model(model, device="cpu") -> CountCeption:
    """A CountCeption, a weights path, or None (the packaged default weights)."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model, device=device)
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, a weights path or None, got {type(model).__name__}")
    return model


def image_to_tensor(image, in_channels: int = 3) -> torch.Tensor:
    """Image -> NCHW float32 tensor of 0..255 intensities.

    Accepts an ``HxWxC`` or ``HxW`` numpy array (uint8, uint16 or float in
    0..255) or a ``CHW``/``NCHW`` tensor. Conversions: grayscale is repeated to
    3 channels, RGBA drops alpha, uint16 is scaled to 0..255 (x / 257).
    """
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise TypeError(f"image must be a numeric array, got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"image must be HxW or HxWxC, got shape {image.shape}")
        scale = 1.0 / 257.0 if image.dtype == np.uint16 else 1.0
        with warnings.catch_warnings():  # read-only arrays (e.g. from PIL) are fine: `* scale` makes a new tensor
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(torch.float32) * scale
    elif isinstance(image, torch.Tensor):
        t = image
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4:
            raise ValueError(f"image tensor must be CHW or NCHW, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"image tensor must be real numeric, got dtype {t.dtype}")
        t = t.to(torch.float32) if not t.is_floating_point() else t
    else:
        raise TypeError(f"image must be a numpy array or torch tensor, got {type(image).__name__}")
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise ValueError(f"image is empty: shape {tuple(t.shape)}")
    c = t.shape[1]
    if c != in_channels:
        if in_channels == 3 and c == 1:
            t = t.expand(-1, 3, -1, -1)
        elif in_channels == 3 and c == 4:
            t = t[:, :3]
        else:
            raise ValueError(f"image has {c} channels, the model expects {in_channels}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("image contains NaN or infinite values")
    return t


@torch.inference_mode()
def count_image(image, model=None, device="cpu") -> float:
    """Count objects in one image.

    Args:
        image: ``HxWx3`` uint8 array (or see ``image_to_tensor``) or a
            ``CHW``/``NCHW`` float tensor of 0..255 intensities (N must be 1).
        model: a CountCeption, a weights path, or None for the default weights.
        device: torch device to run on.
    """
    model = resolve_model(model, device)
    dev = torch.device(device)
    if next(model.parameters()).device.type != dev.type:
        model = copy.deepcopy(model).to(dev)  # never move the caller's model behind their back
    x = image_to_tensor(image, model.in_channels)
    if x.shape[0] != 1:
        raise ValueError(f"count_image takes one image, got a batch of {x.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        cmap = model(x.to(device))
    finally:
        model.train(was_training)
    return float(redundant_count(cmap, model.patch_size, model.stride).sum())
