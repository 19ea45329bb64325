"""Inference backends behind one call: ``compile(model, backend, precision)``.

Every backend returns a callable with the contract of ``model(x)``: an NCHW
float tensor of 0..255 intensities -> the count map ``(N, 1, H', W')``.

- ``"eager"``: the plain module in eval mode (the reference, :mod:`.eager`).
- ``"cpu"``: the CPU fast path (:mod:`.cpu`).
- ``"triton"``: fused Triton kernels (:mod:`.triton`): a CUDA device, or
  ``TRITON_INTERPRET=1`` with CPU tensors.
- ``"auto"``: the backend that declares the device's type among its
  ``auto_devices`` and is available there (triton on CUDA, cpu on the CPU),
  else eager.

A new backend is one module declaring a :class:`~.backend.Backend` and one
entry in ``REGISTRY``.
"""
from __future__ import annotations

import torch

from ..model import CountCeption
from . import cpu, eager, triton
from .backend import Backend
from .eager import EagerBackend
from .plan import FoldedConv, FoldedInception, Plan, fold
from .rounding import Bf16Rounding, calibrate_bf16

__all__ = ["compile", "available_backends", "auto_backend", "fold", "Plan", "FoldedConv", "FoldedInception",
           "Backend", "REGISTRY", "BACKENDS", "PRECISIONS", "DEFAULT_BACKEND", "EagerBackend", "Bf16Rounding",
           "calibrate_bf16"]

# name -> Backend, in the order they are listed (the reference first).
REGISTRY = {b.name: b for b in (eager.BACKEND, cpu.BACKEND, triton.BACKEND)}
DEFAULT_BACKEND = "auto"
BACKENDS = (DEFAULT_BACKEND, *REGISTRY)
PRECISIONS = tuple(dict.fromkeys(p for b in REGISTRY.values() for p in b.precisions))  # fp32, bf16, fp16


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on ``device`` in this installation."""
    dev = torch.device(device)
    return [name for name, b in REGISTRY.items() if b.is_available(dev)]


def auto_backend(device) -> Backend:
    """What ``backend="auto"`` runs on ``device``."""
    dev = torch.device(device)
    for b in REGISTRY.values():
        if dev.type in b.auto_devices and b.is_available(dev):
            return b
    return eager.BACKEND


def compile(model: CountCeption, backend: str = DEFAULT_BACKEND, precision: str = "fp32", device=None, **options):
    """Turn an eval-mode CountCeption into a fast inference callable (see module doc).

    ``options`` go to the chosen backend's ``build``: for "cpu" ``fft_size``, ``large``,
    ``merge``, ``threads``, ``reuse_memory``, ``rounding`` (see :func:`fastcount.inference.cpu.build`);
    for "triton" ``tf32``.
    """
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    chosen = auto_backend(dev) if backend == "auto" else REGISTRY[backend]
    return chosen.build(model, precision=precision, device=dev, **options)
