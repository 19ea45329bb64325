"""Triton backend: the whole Count-ception forward as fused kernels.

The plan (BN folded, fp32) is laid out once for the kernels in
``fastcount.kernels``; a forward is then one launch per layer: the first
conv, each Inception block (both branches, concatenated in place), the two
large valid convs, and one launch for the whole 1x1 head. Activations stay
NHWC in the compute dtype (fp32, bf16 or fp16); every GEMM accumulates in
fp32 and the folded bias + LeakyReLU are applied in each kernel's epilogue.

Runs on a CUDA device, or on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before ``fastcount.kernels`` was imported
(slow: for tests only).

Output stride s > 1: the head's 1x1 convs are pointwise, so the 18x18 conv
before them is evaluated at stride s directly (s^2 less work) and the head
runs at stride 1; same result as the module.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ..model import INCEPTION, CountCeption
from .backend import Backend, check_input
from .plan import Plan, fold

__all__ = ["TritonBackend", "build", "is_available", "PRECISIONS", "BACKEND"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(_DTYPES)


def _kernels():
    """The kernel modules, or None when triton is not importable."""
    try:
        return importlib.import_module("fastcount.kernels")
    except ImportError:
        return None


def is_available(device="cuda") -> bool:
    """True when this backend can run on ``device``: a CUDA device with triton
    importable, or the CPU with Triton's interpreter active (TRITON_INTERPRET=1)."""
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError):
        return False
    k = _kernels()
    if k is None:
        return False
    if dev.type == "cuda":
        return torch.cuda.is_available() and not k.interpreting()
    if dev.type == "cpu":
        return k.interpreting()
    return False


def _unavailable_reason(dev: torch.device) -> str:
    k = _kernels()
    if k is None:
        return "triton is not importable (pip install 'fastcount[triton]')"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "device is CUDA but torch sees no CUDA device"
        return "TRITON_INTERPRET=1 is active, which runs kernels on the CPU only; unset it for CUDA"
    if dev.type == "cpu":
        return (
            "device is the CPU: the triton backend needs a CUDA device, or TRITON_INTERPRET=1 set "
            "before fastcount.kernels is imported (slow, for tests)"
        )
    return f"device type {dev.type!r} is not supported (expected 'cuda', or 'cpu' under TRITON_INTERPRET=1)"


class TritonBackend:
    """Callable: NCHW float tensor (0..255 intensities) -> count map ``(N, 1, H', W')`` fp32.

    Args:
        plan: a folded ``Plan`` (see ``fastcount.inference.fold``).
        precision: "fp32", "bf16" or "fp16": storage and tensor-core input
            dtype of weights and activations; accumulation is fp32 always.
        device: where the weights live and inputs must be.
        tf32: for "fp32" on CUDA, let tl.dot use TF32 tensor cores. Default:
            follow ``torch.backends.cudnn.allow_tf32`` (what eager convs use).
    """

    name = "triton"

    def __init__(self, plan: Plan, precision: str = "fp32", device="cuda", tf32: bool | None = None):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {tuple(_DTYPES)}, got {precision!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if not is_available(dev):
            raise ValueError(f"device {dev} cannot run the triton backend: {_unavailable_reason(dev)}")
        from ..kernels import conv_bn_lrelu, head, inception

        self._k_conv, self._k_inc, self._k_head = conv_bn_lrelu, inception, head
        self.precision = precision
        self.device = dev
        self.dtype = _DTYPES[precision]
        self.tf32 = bool(torch.backends.cudnn.allow_tf32 if tf32 is None else tf32) and dev.type == "cuda"
        self.geometry = plan.geometry
        self.in_channels = plan.in_channels
        plan = plan.to(dev, torch.float32)
        body, tail = plan.split_head()
        if not (body and len(tail) == 3 and tail[0].stride == 1 and tail[1].stride == 1 and tail[2].out_channels == 1):
            raise ValueError("plan must end in three 1x1 head convs (C -> C1 -> C2 -> 1), as CountCeption does")
        out_stride = tail[2].stride
        self.stages = []  # (kind, weights, stride override)
        for i, (role, layer) in enumerate(zip(plan.roles, body)):
            if role == INCEPTION:
                self.stages.append(("inception", inception.prepare(layer, self.dtype), None))
            else:
                s = layer.stride
                if i == len(body) - 1 and out_stride > 1:
                    if s != 1:
                        raise ValueError("plan has strides on both the last body conv and the head")
                    s = out_stride  # evaluate only the pixels the strided head keeps
                self.stages.append(("conv", conv_bn_lrelu.prepare(layer, self.dtype), s))
        self._head = head.prepare(tail, self.dtype)
        # The stride went into the conv before the head; otherwise the head samples it.
        self._head_stride = out_stride if plan.roles[len(body) - 1] == INCEPTION else 1

    @torch.no_grad()
    def forward(self, x: torch.Tensor, emit_sums: bool = False):
        """Count map ``(N, 1, H', W')`` fp32; with ``emit_sums`` also per-image
        sums of the map ``(N,)`` float64, reduced from the head's per-tile sums."""
        check_input(x, self.in_channels, self.device, self.name)
        # Triton launches on the current CUDA device: make it the weights' device.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            h = x.permute(0, 2, 3, 1)  # NHWC view: the first conv reads NCHW through strides, no copy
            for kind, w, s in self.stages:
                if kind == "inception":
                    h = self._k_inc.inception(h, w, tf32=self.tf32)
                else:
                    h = self._k_conv.conv_bn_lrelu(h, w, stride=s, tf32=self.tf32)
            res = self._k_head.head(h, self._head, stride=self._head_stride, emit_sums=emit_sums, tf32=self.tf32)
        if emit_sums:
            out, sums = res
            return out, sums.double().sum(dim=1)
        return res

    __call__ = forward

    def launches(self):
        """``[(name, fn)]``, one per fused kernel launch in forward order; ``fn``
        takes that launch's NHWC input and returns its output (NHWC, or the
        count map for the head). For per-layer benchmarks and debugging."""
        out = []
        n_conv = n_inc = 0
        for kind, w, s in self.stages:
            if kind == "inception":
                n_inc += 1
                out.append((f"inception{n_inc}", lambda h, w=w: self._k_inc.inception(h, w, tf32=self.tf32)))
            else:
                n_conv += 1
                name = f"conv{n_conv} {w.kernel}x{w.kernel}" + (f" s{s}" if s != 1 else "")
                out.append((name, lambda h, w=w, s=s: self._k_conv.conv_bn_lrelu(h, w, stride=s, tf32=self.tf32)))
        out.append(("head 1x1x3", lambda h: self._k_head.head(h, self._head, stride=self._head_stride, tf32=self.tf32)))
        return out

    def count_map_and_sums(self, x: torch.Tensor):
        """``(count map, per-image map sums float64)`` in one pass (no re-read of the map)."""
        return self.forward(x, emit_sums=True)

    def __repr__(self) -> str:
        return f"TritonBackend(precision={self.precision!r}, device={self.device}, tf32={self.tf32}, layers={len(self.stages) + 1})"


def build(model: CountCeption, precision: str = "fp32", device=None, tf32: bool | None = None) -> TritonBackend:
    """Fold ``model`` (eval-mode BN statistics) and lay it out for the kernels, once."""
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, got {type(model).__name__}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if not is_available(dev):
        raise ValueError(f"device {dev} cannot run the triton backend: {_unavailable_reason(dev)}")
    return TritonBackend(fold(model, torch.float32), precision=precision, device=dev, tf32=tf32)


# On the CPU "triton" is Triton's interpreter (for tests, ~1000x slower): "auto" picks it on CUDA only.
BACKEND = Backend("triton", PRECISIONS, is_available=is_available, build=build, auto_devices=("cuda",))
