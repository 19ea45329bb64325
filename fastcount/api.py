"""One-image counting: ``count_image``."""
from __future__ import annotations

import copy
import os

import torch

from .devices import resolve_device
from .io import load_model
from .localise import LocateParams, locate
from .model import CountCeption
from .ops import redundant_count
from .pixels import image_to_tensor

__all__ = ["count_image", "image_to_tensor", "resolve_model"]


def resolve_model(model, device="cpu") -> CountCeption:
    """A CountCeption, a weights path, or None (the packaged default weights)."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model, device=device)
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, a weights path or None, got {type(model).__name__}")
    return model


@torch.inference_mode()
def count_image(image, model=None, device="auto", points: bool = False):
    """Count objects in one image.

    Args:
        image: ``HxWx3`` uint8 array (or see ``image_to_tensor``) or a
            ``CHW``/``NCHW`` float tensor of 0..255 intensities (N must be 1).
        model: a CountCeption, a weights path, or None for the default weights.
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``,
            ``"cuda"`` or a ``torch.device``.
        points: also locate the objects; returns ``(count, Points)`` (see
            ``fastcount.locate``: (row, col) input-pixel positions and scores).
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
    count = float(redundant_count(cmap, model.patch_size, model.stride).sum())
    if points:
        return count, locate(cmap, patch_size=model.patch_size, stride=model.stride, total=count, image=x,
                             params=LocateParams.of(model))
    return count
