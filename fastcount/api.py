"""One-image counting: ``count_image``."""
from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch

from .devices import resolve_device
from .io import load_model
from .model import CountCeption
from .ops import redundant_count
from .pixels import tensor_to_intensities, to_intensities

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

    Accepts an ``HxWxC`` or ``HxW`` numpy array or a ``CHW``/``NCHW`` tensor;
    dtypes and channels follow the one pixel rule of ``fastcount.pixels``
    (uint8 as is, uint16 / 257, other integers and floats must lie in 0..255;
    grayscale repeated to 3 channels, RGBA drops alpha).
    """
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3) and 0 in image.shape[:2]:
            raise ValueError(f"image is empty: shape {image.shape}")
        if in_channels == 3:  # the common case: the rule's own channel handling
            return _float_nchw(to_intensities(image, "image"))
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"image must be HxW or HxWxC, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a numpy array or torch tensor, got {type(image).__name__}")
    t = image[None] if image.dim() == 3 else image
    if t.dim() != 4:
        raise ValueError(f"image tensor must be CHW or NCHW, got shape {tuple(image.shape)}")
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise ValueError(f"image is empty: shape {tuple(t.shape)}")
    t = tensor_to_intensities(t, "image")
    c = t.shape[1]
    if c != in_channels:
        if in_channels == 3 and c == 1:
            t = t.expand(-1, 3, -1, -1)
        elif in_channels == 3 and c == 4:
            t = t[:, :3]
        else:
            raise ValueError(f"image has {c} channels, the model expects {in_channels}")
    return t


def _float_nchw(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only arrays (e.g. from PIL) are fine: the float cast copies
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a).permute(2, 0, 1)[None].to(torch.float32, copy=True)  # never alias the caller's array


@torch.inference_mode()
def count_image(image, model=None, device="auto") -> float:
    """Count objects in one image.

    Args:
        image: ``HxWx3`` uint8 array (or see ``image_to_tensor``) or a
            ``CHW``/``NCHW`` float tensor of 0..255 intensities (N must be 1).
        model: a CountCeption, a weights path, or None for the default weights.
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``,
            ``"cuda"`` or a ``torch.device``.
    """
    dev = resolve_device(device)
    model = resolve_model(model, dev)
    if next(model.parameters()).device.type != dev.type:
        model = copy.deepcopy(model).to(dev)  # never move the caller's model behind their back
    x = image_to_tensor(image, model.in_channels)
    if x.shape[0] != 1:
        raise ValueError(f"count_image takes one image, got a batch of {x.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        cmap = model(x.to(dev))
    finally:
        model.train(was_training)
    return float(redundant_count(cmap, model.patch_size, model.stride).sum())
