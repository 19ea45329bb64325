"""CPU fast path: ``compile(model, backend="cpu", precision="fp32" | "bf16")``.

What runs where (activations NHWC / channels_last throughout):

- first 3x3 conv (pad r) and the Inception blocks: oneDNN convolutions with
  bias and LeakyReLU fused (``mkldnn._convolution_pointwise``). An Inception
  block's two branches run either as ONE 3x3 conv (the 1x1 weights at the
  centre tap, output channels concatenated: no torch.cat, one pass) or as two
  convs + cat, or (fp32, compiled ops) as one merged 3x3 conv by Winograd
  F(4x4, 3x3) (:mod:`fastcount.inference.winograd`: a quarter of the multiply-adds,
  plus transforms). fp32 picks per block by cost models fitted to per-block
  times on AVX-512 and AVX2 (``_FP32_INCEPTION_NS``); bf16 by multiply-adds +
  bytes moved, on AMX by a roofline per conv (AMX makes the merged form's extra
  multiply-adds nearly free where a block is memory-bound).
- the two large valid convs (14x14, 18x18 for r = 32): FFT overlap-save
  (:class:`fastcount.inference.spectral.SpectralConv`), FFT size per layer and
  input shape from a cost model, weight spectra cached per FFT size. In bf16
  on CPUs with AMX tiles, a layer runs as a direct oneDNN bf16 conv instead
  where a fitted cost says that is cheaper (``large="auto"``): at width 1 the
  14x14 (48 -> 16 channels) does, the 18x18 (128 -> 32) runs by FFT (in fp32, fed
  bf16 activations by the tile gather).
- the 1x1 head, on the stride-s subsampled map (1x1 convs commute with
  subsampling): the compiled ``fastcount::pointwise_mlp`` op on the NHWC map (all
  three layers per block of pixels while it sits in cache: one read of the map,
  4-5x faster than oneDNN's three 1x1 passes at 1024^2 on the 2-core AMD EPYC with
  AVX-512; bit-identical to them there),
  else oneDNN 1x1 convs with the LeakyReLU fused (matmuls on an NCHW map).

``backend.unpadded(x)`` runs the same network with the first conv unpadded (the
caller pads where it wants zeros): ``count_slide`` pads only a tile's true-image-border
sides (``fastcount.slide.compute``), so no tile computes rows it crops away.

Every call runs inside fastcount's caching allocator
(:mod:`fastcount.inference.memory`, ``reuse_memory=True``), so large
activations reuse the previous call's memory instead of fresh mmaps.

BatchNorm is folded (in float64) into every conv. bf16 runs the Inception
blocks and the direct large convs in bfloat16 (fp32 accumulation in oneDNN), every FFT,
the first conv and the 1x1 head in fp32 (cheap, and they set the count's
bias); the count map is returned as float32 like ``model(x)``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._ext import has_compiled_ops
from ..model import FIRST, INCEPTION, LARGE, CountCeption
from ..system import cpu_flags
from .backend import Backend, check_input
from .memory import pooled
from .plan import FoldedConv, FoldedInception, Plan, fold
from .rounding import Bf16Rounding
from .spectral import MIN_FFT_KERNEL, SpectralConv
from .winograd import OUT_PAD, WinogradConv

__all__ = ["build", "CPUBackend", "bf16_supported", "amx_supported", "is_available", "PRECISIONS", "BACKEND"]

PRECISIONS = ("fp32", "bf16")
_CPU = torch.device("cpu")
_pw = torch.ops.mkldnn._convolution_pointwise

# Inception merge cost model (per output pixel): multiply-adds + bytes * (MAC rate / bandwidth).
# Calibrated on the 2-core AVX-512 machine: oneDNN fp32 3x3 convs reach ~180 G MAC/s,
# streaming passes ~8 GB/s, so one byte moved costs about as much as 22 multiply-adds.
_BYTE_IN_MACS = 22.5


def bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amx_supported() -> bool:
    """Whether the CPU has AMX bf16 tiles (oneDNN's fast bf16 convolutions)."""
    return "amx_bf16" in cpu_flags()


# fp32 Inception block cost, ns per output pixel = coefficients . features, per instruction set
# (oneDNN and the Winograd op both take the widest the CPU has). Least-squares fits (relative
# error) to per-block times of 17 block shapes at 305x305 (`python benchmarks/cpu_inception_fit.py`,
# 2-core AMD EPYC with AVX-512; "avx2" is the same CPU with ONEDNN_MAX_CPU_ISA=AVX2 and
# FASTCOUNT_WINOGRAD_ISA=avx2). Within 6-48% per shape; summed over the 17 shapes the
# picked methods take 0.4% (avx512) and 0.5% (avx2) longer than the measured best.
# oneDNN one 3x3 conv / oneDNN 1x1 + 3x3 + cat / Winograd one 3x3 / oneDNN 1x1 + Winograd 3x3 + cat
INCEPTION_METHODS = ("merged", "split", "winograd", "split_winograd")
_ONE_CONV = ("merged", "winograd")  # the methods that run a block as one 3x3 conv
_FP32_INCEPTION_NS = {
    "avx512": {"merged": (3.6e-3, 0.122), "split": (3.9e-3, 0.082), "winograd": (6.9e-3, 0.150, 0.144),
               "split_winograd": (7.1e-3, 0.293, 0.045, 0.159)},
    "avx2": {"merged": (7.6e-3, 0.077), "split": (7.6e-3, 0.081), "winograd": (1.48e-2, -0.007, 0.179),
             "split_winograd": (1.43e-2, 0.238, -0.023, 0.196)},
}


def _inception_features(method: str, cin: int, a: int, b: int) -> tuple:
    o = a + b
    if method == "merged":
        return 9 * cin * o, cin + o
    if method == "split":
        return cin * a + 9 * cin * b, 2 * cin + 3 * o
    if method == "winograd":  # 36 products per 4x4 tile; input and output transforms
        opad = -(-o // OUT_PAD) * OUT_PAD
        return 2.25 * cin * opad, cin, opad
    bpad = -(-b // OUT_PAD) * OUT_PAD  # split_winograd: the 1x1 by oneDNN, the 3x3 by Winograd, the cat
    return cin * a + 2.25 * cin * bpad, cin, bpad, a + b


def _fp32_inception_isa() -> str | None:
    """The cost table for this CPU, or None (neither AVX-512 nor AVX2: no Winograd choice)."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return None


def _fp32_inception_method(cin: int, a: int, b: int, methods=INCEPTION_METHODS) -> str:
    """The cheapest of ``methods`` for one fp32 Inception block by the fitted cost table."""
    isa = _fp32_inception_isa()
    if isa is None:
        m, sp = _merge_cost(cin, a, b)
        return "merged" if m <= sp else "split"
    table = _FP32_INCEPTION_NS[isa]

    def ns(method):
        return sum(c * f for c, f in zip(table[method], _inception_features(method, cin, a, b)))

    return min(methods, key=ns)


def _merge_cost(cin: int, a: int, b: int) -> tuple[float, float]:
    """(merged, split) modelled cost per pixel of one Inception block in fp32."""
    merged = 9 * cin * (a + b) + _BYTE_IN_MACS * 4 * (cin + a + b)
    split = cin * a + 9 * cin * b + _BYTE_IN_MACS * 4 * (2 * cin + 3 * (a + b))
    return merged, split


# Inception merge choice in bf16 on AMX CPUs: a roofline per conv, max(multiply-adds / rate,
# bytes / bandwidth), plus a read and a write of the output for the torch.cat of a split block.
# Measured per block at 305x305, full width: AMX convs run ~0.6 T MAC/s, passes ~10 GB/s.
# AMX makes the merged block's extra multiply-adds (9x the 1x1 branch's) nearly free where the
# block is memory-bound, but not for 160 -> 64+32 (12.0-12.8 ms split, 20.8-21.1 ms merged).
_AMX_MACS_PER_NS = 600.0
_BF16_BYTES_PER_NS = 10.0


def _merge_cost_bf16(cin: int, a: int, b: int) -> tuple[float, float]:
    """(merged, split) modelled ns per pixel of one Inception block in bf16 on AMX."""
    def conv(k, cout):
        return max(k * k * cin * cout / _AMX_MACS_PER_NS, 2 * (cin + cout) / _BF16_BYTES_PER_NS)

    merged = conv(3, a + b)
    split = conv(1, a) + conv(3, b) + 2 * 2 * (a + b) / _BF16_BYTES_PER_NS
    return merged, split


# Large-conv choice in bf16 on AMX CPUs, per output pixel (ns), fitted to per-layer times on
# the 2-core AMX machine at 256x256 and 1024x1024 (benchmarks/cpu_layers.py --bf16-fft):
# oneDNN's direct AMX conv runs ~1 TMAC/s; the fp32 FFT path costs a per-channel part
# (gather, FFTs) and a per-channel-pair part (the mixing). 14x14 (48->16): direct 150 vs
# FFT 273; 18x18 (128->32): direct 1270 vs FFT 885.
_AMX_NS_PER_MAC = 1.0e-3
_FFT_NS_PER_CHANNEL = 3.15
_FFT_NS_PER_PAIR = 0.093


def _amx_direct_cheaper(cin: int, cout: int, k: int) -> bool:
    """Whether oneDNN's direct bf16 AMX conv beats the FFT for a k x k cin -> cout layer."""
    direct = _AMX_NS_PER_MAC * k * k * cin * cout
    fft = _FFT_NS_PER_CHANNEL * (cin + cout) + _FFT_NS_PER_PAIR * cin * cout
    return direct < fft


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _input_nhwc(x: torch.Tensor) -> torch.Tensor:
    """The input image as a new float32 channels_last tensor (the caller's is never touched).

    Interleaving the few channels with ``torch.stack`` is 4x faster than
    ``contiguous(memory_format=channels_last)`` for a 3-channel image (measured at 1024^2 on the
    2-core AMD EPYC with AVX-512).
    """
    x = x.to(torch.float32)
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
        return x.clone(memory_format=torch.channels_last)
    return torch.stack(x.unbind(1), dim=-1).permute(0, 3, 1, 2)


# oneDNN weight prepacking (as inductor's freezing does): saves the per-call weight reorder
# (~5-10% on the 18x18 bf16 conv). The packed layout is chosen for a nominal input size;
# oneDNN reorders again if another size prefers another layout, so any size stays correct.
_PREPACK = True
_NOMINAL_SIDE = 320


def _prepack(w: torch.Tensor, padding: int) -> torch.Tensor:
    if not _PREPACK:
        return w
    try:
        return torch.ops.mkldnn._reorder_convolution_weight(
            w, [padding, padding], [1, 1], [1, 1], 1, [1, w.shape[1], _NOMINAL_SIDE, _NOMINAL_SIDE])
    except (AttributeError, RuntimeError):  # op missing or layout unsupported: dense weights work too
        return w


class _Conv:
    """One oneDNN conv + bias + fused LeakyReLU on channels_last tensors."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, padding: int, slope: float, dtype):
        self.in_dtype = dtype
        self.weight = _prepack(_nhwc(weight.to(dtype)), padding)
        self.bias = bias.to(dtype).contiguous()
        self.padding = [padding, padding]
        self.slope = slope

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _pw(x, self.weight, self.bias, self.padding, [1, 1], [1, 1], 1, "leaky_relu", [self.slope], "")


class _Inception:
    METHODS = INCEPTION_METHODS

    def __init__(self, layer: FoldedInception, dtype, method: str):
        b1, b3 = layer.branch1, layer.branch3
        self.method = method
        self.merged = method in _ONE_CONV
        if self.merged:
            a, b = b1.out_channels, b3.out_channels
            w = b3.weight.new_zeros(a + b, b3.in_channels, 3, 3)
            w[:a, :, 1, 1] = b1.weight[:, :, 0, 0]  # a 1x1 conv is a 3x3 conv with only the centre tap
            w[a:] = b3.weight
            bias = torch.cat([b1.bias, b3.bias])
            if method == "winograd":
                self.conv = WinogradConv(w, bias, b3.slope)
            else:
                self.conv = _Conv(w, bias, 1, b3.slope, dtype)
        else:
            self.conv1 = _Conv(b1.weight, b1.bias, 0, b1.slope, dtype)
            if method == "split_winograd":
                self.conv3 = WinogradConv(b3.weight, b3.bias, b3.slope)
            else:
                self.conv3 = _Conv(b3.weight, b3.bias, 1, b3.slope, dtype)

    def __call__(self, x):
        if self.merged:
            return self.conv(x)
        return torch.cat([self.conv1(x), self.conv3(x)], dim=1)


class _Large:
    """A large valid conv: FFT overlap-save (fp32) or direct oneDNN conv."""

    def __init__(self, layer: FoldedConv, dtype, method: str, fft_size):
        self.method, self.dtype, self.kernel = method, dtype, layer.kernel
        if method == "fft":
            self.fft = SpectralConv(layer.weight, layer.bias, layer.slope, fft_size)
        else:
            self.conv = _Conv(layer.weight, layer.bias, 0, layer.slope, dtype)

    def __call__(self, x):
        """channels_last (N, C, H, W) in -> (N, O, H', W'): fp32 from the FFT (channels_last with the
        compiled ops, else NCHW), channels_last from oneDNN."""
        if self.method == "direct":
            return self.conv(x)
        xh = x.permute(0, 2, 3, 1)  # the NHWC storage as (N, H, W, C); bf16 is widened by the tile gather
        return self.fft(xh.contiguous())


class _Head:
    """The trailing 1x1 convs, applied after the stride-s subsampling: on an NHWC map the
    compiled fused op (``fused``, fp32) or oneDNN 1x1 convs, on an NCHW one matmuls."""

    def __init__(self, layers: list[FoldedConv], dtype, fused: bool = True):
        self.stride = layers[-1].stride
        self.dtype = dtype
        self.w = [l.weight[:, :, 0, 0].to(dtype).contiguous() for l in layers]  # (O, C)
        self.b = [l.bias.to(dtype).contiguous() for l in layers]
        self.slope = [float(l.slope) for l in layers]
        self.fused = fused and dtype == torch.float32 and has_compiled_ops()
        # channels_last input without the fused op: oneDNN 1x1 convs, LeakyReLU fused (a pass per layer)
        self.convs = [] if self.fused else [_Conv(l.weight, l.bias, 0, l.slope, dtype) for l in layers]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        if s > 1:
            x = x[:, :, ::s, ::s]
            if x.stride(1) == 1:  # was channels_last: keep it (a strided view is neither layout)
                x = _nhwc(x)
        n, c, h, w = x.shape
        if not x.is_contiguous(memory_format=torch.channels_last):
            # NCHW (the FFT's output, maybe a cropped view): out (O, HW) = W (O, C) @ x (C, HW) per image
            outs = []
            for i in range(n):
                z = x[i].reshape(c, h * w).to(self.dtype)
                for wt, b, sl in zip(self.w, self.b, self.slope):
                    z = F.leaky_relu_(torch.addmm(b[:, None], wt, z), sl)
                outs.append(z.view(1, -1, h, w))
            return torch.cat(outs).float() if n > 1 else outs[0].float()
        z = x.to(self.dtype)
        if self.fused:
            out = torch.ops.fastcount.pointwise_mlp(z.permute(0, 2, 3, 1).reshape(n * h * w, c), self.w, self.b,
                                                    self.slope)
            return out.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous()
        for conv in self.convs:
            z = conv(z)
        return z.float().contiguous()


@dataclass(frozen=True)
class _Choice:
    """What build() decided, for reports and tests."""

    precision: str
    inception: tuple  # per block: one of INCEPTION_METHODS
    large: tuple
    fft_size: object

    @property
    def merged(self) -> tuple:
        """Per block: whether it runs as one 3x3 conv (oneDNN's or Winograd's)."""
        return tuple(m in _ONE_CONV for m in self.inception)


class CPUBackend:
    """Compiled CPU inference for one CountCeption (see module doc).

    Call with an (N, C, H, W) float tensor of 0..255 intensities; returns the
    count map (N, 1, H', W') float32, as ``model(x)`` would. The input is never
    modified. Thread-safe for concurrent calls (weights are read-only; FFT
    spectra are created under a lock).
    """

    name = "cpu"

    def __init__(self, plan: Plan, precision: str = "fp32", fft_size=None, large: str = "auto", merge="auto",
                 threads: int | None = None, reuse_memory: bool = True, rounding=None, winograd="auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} for the cpu backend, got {precision!r}")
        if winograd not in ("auto", True, False):
            raise ValueError(f"winograd must be 'auto', True or False, got {winograd!r}")
        if winograd is True and (precision != "fp32" or not has_compiled_ops()):
            raise ValueError("winograd=True needs precision='fp32' and the compiled ops (fastcount._C)")
        if precision == "bf16" and not bf16_supported():
            raise ValueError("precision='bf16' needs a CPU with native bf16 (AVX512-BF16 or AMX); use 'fp32'")
        if large not in ("auto", "fft", "direct"):
            raise ValueError(f"large must be 'auto', 'fft' or 'direct', got {large!r}")
        if merge not in ("auto", True, False):
            raise ValueError(f"merge must be 'auto', True or False, got {merge!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if not isinstance(reuse_memory, bool):
            raise ValueError(f"reuse_memory must be True or False, got {reuse_memory!r}")
        if rounding is not None:
            if not isinstance(rounding, Bf16Rounding):
                raise TypeError(f"rounding must be a Bf16Rounding or None, got {type(rounding).__name__}")
            if precision != "bf16":
                raise ValueError(f"rounding applies to precision='bf16' only, got precision={precision!r}")
        # bf16 layers take their values from `rounded` (calibrated bf16 roundings, checked against
        # the plan); FFT and fp32 layers keep the exact plan.
        rounded = rounding.apply(plan) if rounding is not None else plan
        self.rounding = rounding
        self.precision = precision
        self.reuse_memory = reuse_memory
        self.geometry = plan.geometry
        self.in_channels = plan.in_channels
        self.threads = threads
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.dtype = dtype
        amx = precision == "bf16" and amx_supported()
        amx_direct = large == "auto" and amx
        if large == "auto":
            large = "fft"

        body, head = plan.split_head()
        self.ops = []
        methods, larges, n_large = [], [], 0
        wino_auto = winograd == "auto" and merge == "auto" and precision == "fp32" and has_compiled_ops()
        for role, layer, rlayer in zip(plan.roles, body, rounded.layers):
            if role == INCEPTION:
                shape = (layer.branch3.in_channels, layer.branch1.out_channels, layer.branch3.out_channels)
                if winograd is True:
                    method = "winograd"
                elif merge != "auto":
                    method = "merged" if merge else "split"
                elif precision == "bf16":
                    # without AMX (AVX512-BF16 only) multiply-adds are dear: merge only if cheaper in fp32 terms
                    m_cost, s_cost = _merge_cost_bf16(*shape) if amx else _merge_cost(*shape)
                    method = "merged" if m_cost <= s_cost else "split"
                else:
                    method = _fp32_inception_method(*shape, methods=INCEPTION_METHODS if wino_auto
                                                    else ("merged", "split"))
                self.ops.append(_Inception(rlayer if precision == "bf16" else layer, dtype, method))
                methods.append(method)
            elif role == LARGE:
                method = large if layer.kernel >= MIN_FFT_KERNEL else "direct"
                if amx_direct and method == "fft" and _amx_direct_cheaper(layer.in_channels, layer.out_channels, layer.kernel):
                    method = "direct"
                size = fft_size[n_large] if isinstance(fft_size, (tuple, list)) else fft_size
                src = rlayer if method == "direct" and precision == "bf16" else layer
                self.ops.append(_Large(src, dtype, method, size if method == "fft" else None))
                larges.append((layer.kernel, method))
                n_large += 1
            else:
                if role != FIRST or layer.stride != 1:
                    raise ValueError(f"only the final 1x1 conv may have a stride, got {layer}")
                # bf16 keeps the first conv (3 input channels, cheap) in fp32: rounding its
                # weights to bf16 shifts every pixel of the map the same way, a count bias
                # that does not average out (measured: 4x larger count error).
                self.ops.append(_Conv(layer.weight, layer.bias, layer.padding, layer.slope, torch.float32))
                self._first_unpadded = _Conv(layer.weight, layer.bias, 0, layer.slope, torch.float32)
        # The head is cheap too (1x1 convs on 64 channels at width 1); fp32 keeps the count sum exact-ish.
        self.head = _Head(head, torch.float32) if head else None
        self.choice = _Choice(precision, tuple(methods), tuple(larges), fft_size)

    def fft_sizes(self, height: int, width: int, batch: int = 1) -> list[int]:
        """The FFT size each FFT layer would use for an input of this size (for reports)."""
        out, h, w = [], height, width
        grow = 2 * self.geometry.first_pad - (self.geometry.kernels[0] - 1)  # the first conv's output side - input side
        h, w = h + grow, w + grow
        for op in self.ops:
            if isinstance(op, _Large):
                k = op.kernel
                if op.method == "fft":
                    out.append(op.fft.size_for(batch, h, w))
                h, w = h - k + 1, w - k + 1
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, unpadded=False)

    def unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """The count map with the first conv's zero padding (r on every side) left out.

        ``unpadded(F.pad(x, (r, r, r, r)))`` equals ``self(x)``; a slide tile pads only the
        sides on the true image border and reads the real pixels (its halo) elsewhere, so
        the map it computes is only the rows it keeps plus 6 on each side (the padded 3x3
        convs' margin) instead of r + 6 + r. Output: (N, 1, ceil((H - r) / s), ceil((W - r) / s));
        full-resolution row j is centred on input row j + r/2.
        """
        r = self.geometry.patch_size
        if isinstance(x, torch.Tensor) and x.dim() == 4 and min(x.shape[2:]) <= r:
            raise ValueError(f"x must be larger than the patch size {r} on both sides for unpadded(), "
                             f"got shape {tuple(x.shape)}")
        return self._run(x, unpadded=True)

    def _run(self, x: torch.Tensor, unpadded: bool) -> torch.Tensor:
        check_input(x, self.in_channels, _CPU, self.name)
        old = torch.get_num_threads()
        want = self.threads or _all_cores()
        if want != old:
            torch.set_num_threads(want)
        try:
            with torch.inference_mode(), pooled(self.reuse_memory):
                return self._forward(x, unpadded)
        finally:
            if want != old:
                torch.set_num_threads(old)

    def _forward(self, x: torch.Tensor, unpadded: bool = False) -> torch.Tensor:
        y = _input_nhwc(x)
        ops = [self._first_unpadded, *self.ops[1:]] if unpadded else self.ops
        for op in ops:
            if isinstance(op, _Large):
                y = op(y if op.method == "fft" or y.dtype == self.dtype else y.to(self.dtype))
                if op.method == "fft" and op is not self._last_large():
                    y = _nhwc(y.to(self.dtype))
            else:
                want = getattr(op, "in_dtype", self.dtype)
                y = op(y if y.dtype == want else y.to(want))
        if self.head is None:
            return y.float().contiguous()
        return self.head(y)

    def _last_large(self):
        for op in reversed(self.ops):
            if isinstance(op, _Large):
                return op
        return None

    def __repr__(self):
        return f"CPUBackend(precision={self.precision!r}, inception={self.choice.inception}, large={self.choice.large})"


def _all_cores() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    # torch's default is the physical core count; never ask for fewer threads than that.
    return max(n, torch.get_num_threads()) if n else torch.get_num_threads()


def build(model: CountCeption, precision: str = "fp32", device=None, **options) -> CPUBackend:
    """Fold ``model`` and build the CPU fast path.

    Args:
        model: a CountCeption (its current BN statistics are folded; train/eval
            mode does not matter, inference always uses the running statistics).
        precision: "fp32" or "bf16" ("fp16" is not supported on CPU).
        device: None or a CPU device.
        **options: ``fft_size`` (int, or a pair for the two large convs; None =
            cost model), ``large`` ("auto" | "fft" | "direct"), ``merge``
            ("auto" | True | False: oneDNN merged or split Inception blocks), ``winograd``
            ("auto" | True | False: fp32 Inception blocks by Winograd F(4x4, 3x3); "auto" = by
            the cost model, when ``merge`` is "auto"), ``threads`` (None = all cores), ``reuse_memory``
            (True: run inside :func:`fastcount.inference.memory.pooled`, so activations
            reuse the previous call's memory instead of fresh page-faulted mmaps),
            ``rounding`` (bf16 only: a :class:`~fastcount.inference.rounding.Bf16Rounding`
            from :func:`~fastcount.inference.calibrate_bf16`; None = round to nearest;
            "auto" (default) = ``model.bf16_rounding`` if the model carries one, as
            ``load_model`` attaches from the weights file, else nearest).
    """
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {PRECISIONS} for the cpu backend, got {precision!r}"
            + (" (fp16 has no fast CPU kernels; use 'bf16')" if precision == "fp16" else "")
        )
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"device must be a CPU device for the cpu backend, got {device!r}")
    plan = fold(model, dtype=torch.float64).to("cpu")
    rounding = options.pop("rounding", "auto")
    if isinstance(rounding, str):
        if rounding != "auto":
            raise ValueError(f"rounding must be 'auto', None or a Bf16Rounding, got {rounding!r}")
        rounding = getattr(model, "bf16_rounding", None) if precision == "bf16" else None
        if rounding is not None:
            try:
                rounding.check(plan)
            except ValueError as e:
                # the weights changed since calibration (e.g. fine-tuned): say so, never use stale values
                warnings.warn(f"model.bf16_rounding is stale, rounding bf16 weights to nearest instead: {e}",
                              stacklevel=3)
                rounding = None
    return CPUBackend(plan, precision, rounding=rounding, **options)


def is_available(device) -> bool:
    """The CPU fast path runs on the CPU only."""
    return torch.device(device).type == "cpu"


BACKEND = Backend("cpu", PRECISIONS, is_available=is_available, build=build, auto_devices=("cpu",))
