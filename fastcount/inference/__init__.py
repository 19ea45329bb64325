"""Inference backends behind one call: ``compile(model, backend, precision)``.

Every backend returns a callable with the contract of ``model(x)``: an NCHW
float tensor of 0..255 intensities -> the count map ``(N, 1, H', W')``.

- ``"eager"``: the plain module in eval mode (the reference).
- ``"cpu"``: the CPU fast path (``fastcount.inference.cpu``), when built.
- ``"triton"``: fused Triton kernels (``fastcount.inference.triton``): a CUDA
  device, or ``TRITON_INTERPRET=1`` with CPU tensors.
- ``"auto"``: triton on CUDA, cpu on CPU, else eager.
"""
from __future__ import annotations

import importlib

import torch

from ..model import CountCeption
from .plan import FoldedConv, FoldedInception, Plan, fold
from .rounding import Bf16Rounding, calibrate_bf16

__all__ = ["compile", "available_backends", "fold", "Plan", "FoldedConv", "FoldedInception", "BACKENDS", "PRECISIONS",
           "Bf16Rounding", "calibrate_bf16"]

BACKENDS = ("auto", "eager", "cpu", "triton")
PRECISIONS = ("fp32", "bf16", "fp16")
# backend name -> module defining build(model, precision, device) -> callable
_MODULES = {"cpu": "fastcount.inference.cpu", "triton": "fastcount.inference.triton"}


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


def _module(backend: str):
    try:
        return importlib.import_module(_MODULES[backend])
    except ImportError:
        return None


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on ``device`` in this installation."""
    dev = torch.device(device)
    out = ["eager"]
    if _module("cpu") is not None and dev.type == "cpu":
        out.append("cpu")
    mod = _module("triton")
    if mod is not None and getattr(mod, "is_available", lambda d: False)(dev):
        out.append("triton")
    return out


def compile(model: CountCeption, backend: str = "auto", precision: str = "fp32", device=None, **options):
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
    if backend == "auto":
        avail = available_backends(dev)
        # On the CPU "triton" is Triton's interpreter (for tests, ~1000x slower): never chosen automatically.
        backend = "triton" if dev.type == "cuda" and "triton" in avail else "cpu" if "cpu" in avail else "eager"
    if backend == "eager":
        if options:
            raise TypeError(f"backend 'eager' takes no options, got {sorted(options)}")
        return EagerBackend(model, precision)
    mod = _module(backend)
    if mod is None:
        raise ValueError(f"backend {backend!r} is not available in this installation")
    return mod.build(model, precision=precision, device=dev, **options)
