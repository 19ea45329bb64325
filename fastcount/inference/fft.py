"""Large-kernel convolution by FFT overlap-save, for inference and training.

A valid (pad 0, stride 1) cross-correlation with a ``k x k`` kernel is cut into
output tiles of ``B = T - k + 1`` pixels; each tile reads a ``T x T`` input tile
(overlapping its neighbours by ``k - 1``). Per tile:

    Y(f) = X(f) @ conj(K(f))      (per frequency f: a (tiles x C) @ (C x O) matmul)

where ``X = rfft2(input tile)`` and ``K = rfft2(kernel zero-padded to T)``;
circular wrap-around only touches the ``k - 1`` rows/cols that are cropped.
The cost is a few FFT passes plus one batched matmul per frequency, instead of
``k*k*C*O`` multiply-adds per output pixel.

- :func:`fft_conv2d`: differentiable NCHW function (autograd through
  ``torch.fft``), the reference-compatible form used in training and tests.
- :class:`FFTConv2d`: an ``nn.Conv2d`` stand-in (same parameter names) built on it.
- :func:`use_fft_convs`: swap a CountCeption's two large convs to/from FFTConv2d.
- :class:`SpectralConv`: the inference form (NHWC in, NCHW out, weight spectra cached
  per FFT size, bias folded into the DC term, LeakyReLU in the output pass).
- :func:`spectral_mix`: its per-frequency channel mixing, by the compiled CPU op
  ``torch.ops.fastcount.spectral_mix`` (reads rfft2's layout, writes irfft2's: no
  transposes) or, without the extension, by transposes and batched real GEMMs.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import nn

from .._ext import has_compiled_ops
from ..model import LARGE

__all__ = [
    "smooth_sizes",
    "fft_cost",
    "choose_fft_size",
    "fft_conv2d",
    "FFTConv2d",
    "use_fft_convs",
    "SpectralConv",
    "spectral_mix",
    "pack_spectrum",
    "has_spectral_mix_op",
    "has_gather_tiles_op",
    "has_crop_tiles_op",
]

# Cost model constants (seconds per unit), fitted (non-negative least squares on relative
# error) to 150 timings of both large layers at 256, 512 and 1024 px inputs and every
# candidate size, inside the memory pool, on the 2-core AVX-512 development machine
# (benchmarks/cpu_layers.py --fft-sizes gives such a sweep).
_FFT_FLOP_S = 1.0 / 86e9  # FFT butterflies (~2.5 T^2 log2 T^2 per real 2-D transform)
_MIX_FLOP_S = 1.0 / 121e9  # the complex channel mixing (compiled spectral_mix op)
_BYTE_S = 1.0 / 9.4e9  # streaming passes (tile gather, spectra, crop)
_WBYTE_S = 1.0 / 94e9  # weight spectra (read once per frequency block, from L2 for several tiles)
_TRANSFORM_S = 8.8e-8  # fixed overhead per 2-D transform
# Largest FFT size considered: the cached weight spectrum of the 18x18 layer is
# F * C * O complex (packed for the compiled mixing op), about 140 MB at T = 128, and
# twice that in the real-block form of the GEMM fallback (and grows with T^2).
MAX_FFT = 128
# Smallest large-conv kernel worth an FFT in inference; below it oneDNN's direct conv wins.
MIN_FFT_KERNEL = 5


def smooth_sizes(lo: int, hi: int) -> list[int]:
    """FFT lengths in ``[lo, hi]`` whose only prime factors are 2, 3, 5 (fast in MKL/pocketfft)."""
    out = []
    for n in range(max(lo, 1), hi + 1):
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            out.append(n)
    return out


def _fast_fft_size(t: int) -> bool:
    """Sizes 2^a * 5 and 2^a * 15 (a >= 1): the ones whose rfft2 (and the strided passes
    around it) ran consistently fast in the size sweeps. Other 2,3,5-smooth sizes ran up to
    1.5-2x slower than the model predicts: powers of two >= 64 (cache-set aliasing of the
    strided passes), repeated radix-3/5 factors (81, 125, 135), and 96, 72, 64 generally."""
    if t % 2:
        return False
    m = t // 2
    while m % 2 == 0:
        m //= 2
    return m in (5, 15)


def _grid(out_h: int, out_w: int, k: int, t: int):
    b = t - k + 1
    return b, math.ceil(out_h / b), math.ceil(out_w / b)


def fft_cost(c_in: int, c_out: int, k: int, out_h: int, out_w: int, t: int, n: int = 1,
             weight_passes: float = 1.0) -> float:
    """Modelled seconds of one overlap-save layer with FFT size ``t`` (fitted on one machine;
    only the ranking of sizes matters).

    Counts FFT flops (~2.5 T^2 log2 T^2 per real 2-D transform), the complex
    channel mixing (8 real flops per complex multiply-add), the bytes of the
    streaming passes (tile gather, spectra, output crop) and of the weight spectra
    (``F*C*O`` complex, read ``weight_passes`` times: once in inference, several
    times in training, where they are also re-transformed and differentiated
    every step), and a fixed cost per transform. Larger tiles waste less overlap
    but have larger weight spectra and fewer tiles to reuse them over.
    """
    b, ny, nx = _grid(out_h, out_w, k, t)
    p = n * ny * nx
    f = t * (t // 2 + 1)
    fft = 2.5 * t * t * math.log2(t * t) * p * (c_in + c_out)
    mix = 8.0 * f * p * c_in * c_out
    bytes_ = 4 * p * t * t * c_in * 2 + 8 * p * f * (2 * c_in + 2 * c_out) + 4 * p * t * t * c_out
    weights = 8 * f * c_in * c_out * weight_passes
    if weight_passes > 1:  # training: the weight spectra are transformed (and back-propagated) every step
        fft += 2.5 * t * t * math.log2(t * t) * c_in * c_out * weight_passes
    return fft * _FFT_FLOP_S + mix * _MIX_FLOP_S + bytes_ * _BYTE_S + weights * _WBYTE_S + p * (c_in + c_out) * _TRANSFORM_S


def choose_fft_size(c_in: int, c_out: int, k: int, out_h: int, out_w: int, n: int = 1,
                    weight_passes: float = 1.0) -> int:
    """The 2,3,5-smooth FFT size with the lowest :func:`fft_cost` for this layer and input."""
    # One tile covering the whole map is the largest useful size; tiles under 2k are mostly
    # overlap; past MAX_FFT the weight spectra (F*C*O complex) take too much memory.
    whole = smooth_sizes(max(out_h, out_w) + k - 1, 2 * (max(out_h, out_w) + k))[0]
    top = max(k + 1, min(whole, max(MAX_FFT, 2 * k)))
    smooth = smooth_sizes(min(2 * k, top), top)
    cands = [t for t in smooth if _fast_fft_size(t)] or smooth or smooth_sizes(k + 1, 2 * k + 2)[:1]
    return min(cands, key=lambda t: fft_cost(c_in, c_out, k, out_h, out_w, t, n, weight_passes))


def _check_fft_size(t: int, k: int) -> int:
    if isinstance(t, bool) or not isinstance(t, int) or t <= k:
        raise ValueError(f"fft_size must be an int greater than the kernel size {k}, got {t!r}")
    return t


def kernel_spectrum(weight: torch.Tensor, t: int) -> torch.Tensor:
    """``conj(rfft2(weight, s=(t, t)))`` as (F, C_in, C_out) complex, F = t*(t//2+1).

    conj turns the FFT's convolution into the network's cross-correlation.
    Differentiable (used every training step).
    """
    o, c = weight.shape[:2]
    spec = torch.fft.rfft2(weight, s=(t, t)).conj()  # (O, C, t, t//2+1)
    return spec.permute(2, 3, 1, 0).reshape(t * (t // 2 + 1), c, o).resolve_conj()


def fft_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               fft_size: int | None = None) -> torch.Tensor:
    """Valid (pad 0, stride 1) ``F.conv2d(x, weight, bias)`` by FFT overlap-save.

    Args:
        x: (N, C, H, W) float tensor, H and W at least the kernel size.
        weight: (O, C, k, k).
        bias: (O,) or None.
        fft_size: FFT tile side T > k; None picks it with :func:`choose_fft_size`.

    Differentiable in ``x``, ``weight`` and ``bias`` (autograd through torch.fft).
    Computed in float32 (float64 stays float64).
    """
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1] or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"x must be (N, C, H, W) and weight (O, C, k, k) with matching C; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    n, c, h, w = x.shape
    o, k = weight.shape[0], weight.shape[2]
    if h < k or w < k:
        raise ValueError(f"x spatial size {h}x{w} is smaller than the {k}x{k} kernel of a valid convolution")
    ho, wo = h - k + 1, w - k + 1
    if fft_size is None:
        # Training rebuilds and differentiates the weight spectra every step: weigh them more.
        passes = 8.0 if torch.is_grad_enabled() and weight.requires_grad else 1.0
        t = choose_fft_size(c, o, k, ho, wo, n, passes)
    else:
        t = _check_fft_size(fft_size, k)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, weight = x.to(dt), weight.to(dt)
    b, ny, nx = _grid(ho, wo, k, t)
    hp, wp = (ny - 1) * b + t, (nx - 1) * b + t
    xp = torch.nn.functional.pad(x, (0, wp - w, 0, hp - h))
    tiles = xp.unfold(2, t, b).unfold(3, t, b)  # (N, C, ny, nx, t, t)
    tf = t // 2 + 1
    xs = torch.fft.rfft2(tiles)  # (N, C, ny, nx, t, tf)
    p = n * ny * nx
    # (F, P, [re C | im C]) real, so the complex mixing is real GEMMs (PyTorch's complex
    # bmm and its backward run far slower on CPU than sgemm).
    xs = torch.view_as_real(xs).permute(4, 5, 0, 2, 3, 6, 1).reshape(t * tf, p, 2 * c)
    k = torch.view_as_real(kernel_spectrum(weight, t))  # (F, C, O, 2)
    kr, ki = k[..., 0], k[..., 1]
    # One real GEMM per frequency: [xr | xi] @ [[kr, ki], [-ki, kr]] = [yr | yi]. A single
    # bmm whose output is only sliced keeps every backward GEMM on contiguous operands.
    m = torch.cat([torch.cat([kr, ki], 2), torch.cat([-ki, kr], 2)], 1)  # (F, 2C, 2O)
    ys = torch.bmm(xs, m)  # (F, P, 2O)
    ys = torch.complex(ys[..., :o], ys[..., o:]).reshape(t, tf, n, ny, nx, o).permute(2, 5, 3, 4, 0, 1)
    y = torch.fft.irfft2(ys, s=(t, t))[..., :b, :b]  # (N, O, ny, nx, b, b)
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, o, ny * b, nx * b)[:, :, :ho, :wo]
    if bias is not None:
        y = y + bias.to(dt)[None, :, None, None]
    return y


class FFTConv2d(nn.Module):
    """Valid stride-1 conv by FFT, a stand-in for ``nn.Conv2d(c_in, c_out, k)``.

    Parameters are named ``weight``/``bias`` like nn.Conv2d's, so state dicts
    and optimisers see the same model. The FFT size per input shape is chosen
    by the cost model unless ``fft_size`` is given.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 fft_size: int | None = None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding, self.stride = (kernel_size, kernel_size), (0, 0), (1, 1)
        self.fft_size = None if fft_size is None else _check_fft_size(fft_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, fft_size: int | None = None) -> "FFTConv2d":
        """Share ``conv``'s Parameters (no copy): optimiser state stays valid."""
        k = conv.kernel_size[0]
        if (conv.kernel_size != (k, k) or conv.padding not in ((0, 0), 0) or conv.stride != (1, 1)
                or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"):
            raise ValueError(f"conv must be a square valid stride-1 Conv2d to run by FFT, got {conv}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_channels, m.out_channels = conv.in_channels, conv.out_channels
        m.kernel_size, m.padding, m.stride = (k, k), (0, 0), (1, 1)
        m.fft_size = None if fft_size is None else _check_fft_size(fft_size, k)
        m.weight = conv.weight
        m.bias = conv.bias
        return m

    def to_conv(self) -> nn.Conv2d:
        """An nn.Conv2d sharing this module's Parameters."""
        k = self.kernel_size[0]
        conv = nn.Conv2d(self.in_channels, self.out_channels, k, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight = self.weight
        if self.bias is not None:
            conv.bias = self.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # cuDNN/Triton own the GPU path; FFT mixing here is tuned for CPU
            return torch.nn.functional.conv2d(x, self.weight, self.bias)
        y = fft_conv2d(x, self.weight, self.bias, self.fft_size)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[0]}, fft_size={self.fft_size}"


def _large_convs(model):
    """The large valid convs of a CountCeption worth an FFT in training (kernel > 3)."""
    return [m for role, m in zip(model.roles, model.layers) if role == LARGE and m.conv.kernel_size[0] > 3]


def use_fft_convs(model, enabled: bool = True, fft_size: int | None = None):
    """Swap ``model``'s large valid convs to FFTConv2d (or back), in place, sharing Parameters.

    State-dict keys are unchanged either way, so checkpoints and optimisers
    are unaffected. Returns ``model``.
    """
    for block in _large_convs(model):
        conv = block[0]
        if enabled and not isinstance(conv, FFTConv2d):
            block[0] = FFTConv2d.from_conv(conv, fft_size)
        elif not enabled and isinstance(conv, FFTConv2d):
            block[0] = conv.to_conv()
    return model


# --------------------------------------------------------------------------- inference


# Packed weight-spectrum layout of torch.ops.fastcount.spectral_mix (csrc/cpu/spectral_mix_cpu.cpp):
# frequencies in blocks of _MIX_BLOCK, out channels in groups of _MIX_OGROUP, re/im planar.
_MIX_BLOCK = 16
_MIX_OGROUP = 4


def has_gather_tiles_op() -> bool:
    """True when the compiled ``fastcount::gather_tiles`` CPU op is available."""
    return has_compiled_ops()


def has_crop_tiles_op() -> bool:
    """True when the compiled ``fastcount::crop_tiles`` CPU op is available."""
    return has_compiled_ops()


def _gather_rfft2(x: torch.Tensor, t: int, b: int, ny: int, nx: int) -> torch.Tensor:
    """rfft2 of the overlap-save tiles of NHWC ``x``: (C, N*ny*nx, t, t//2+1); the reference path.

    NHWC -> (C, N, H, W) by one 2-D transpose, then zero-padded to whole tiles.
    """
    n, h, w, c = x.shape
    hp, wp = (ny - 1) * b + t, (nx - 1) * b + t
    xc = torch.empty(c, n * h * w, dtype=x.dtype)
    xc.copy_(x.reshape(n * h * w, c).t())
    hq, wq = max(hp, h), max(wp, w)
    xp = torch.empty(c, n, hq, wq, dtype=x.dtype)
    xp[:, :, :h, :w] = xc.view(c, n, h, w)
    xp[:, :, h:].zero_()  # zero only the padding strips
    xp[:, :, :h, w:].zero_()
    del xc
    tiles = xp.unfold(2, t, b).unfold(3, t, b)  # (C, N, ny, nx, t, t), rows contiguous
    return torch.fft.rfft2(tiles).reshape(c, n * ny * nx, t, t // 2 + 1)


def has_spectral_mix_op() -> bool:
    """True when the compiled ``fastcount::spectral_mix`` CPU op is available."""
    return has_compiled_ops()


def pack_spectrum(k: torch.Tensor) -> torch.Tensor:
    """(F, C, O) complex weight spectrum -> the float32 layout the compiled op reads.

    Shape (ceil(F/16), ceil(O/4), C, 4, 2, 16): per block of 16 frequencies and
    group of 4 out channels, for each input channel the 4 channels' real then
    imaginary parts, frequency innermost; zero-padded past F and O.
    """
    f, c, o = k.shape
    nb, g = -(-f // _MIX_BLOCK), -(-o // _MIX_OGROUP)
    kp = torch.zeros(nb * _MIX_BLOCK, c, g * _MIX_OGROUP, dtype=k.dtype)
    kp[:f, :, :o] = k
    kp = torch.view_as_real(kp).view(nb, _MIX_BLOCK, c, g, _MIX_OGROUP, 2)
    return kp.permute(0, 3, 2, 4, 5, 1).to(torch.float32).contiguous()


def _block_spectrum(k: torch.Tensor) -> torch.Tensor:
    """(F, C, O) complex -> (F, 2C, 2O) float32 real-block form for the GEMM path.

    Rows: the re(x) block then the im(x) block; columns: (o, re/im) interleaved,
    so the GEMM output reads directly as complex64 (F, P, O).
    """
    f, c, o = k.shape
    kr, ki = k.real, k.imag
    m = torch.empty(f, 2, c, o, 2, dtype=kr.dtype)
    m[:, 0, :, :, 0], m[:, 0, :, :, 1] = kr, ki
    m[:, 1, :, :, 0], m[:, 1, :, :, 1] = -ki, kr
    return m.reshape(f, 2 * c, 2 * o).to(torch.float32).contiguous()


def _mix_gemm(xs: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch mixing: (C, P, F) complex64 x (F, 2C, 2O) real-block -> (P, O, F) complex64.

    PyTorch FFTs write the transformed dims innermost while the per-frequency
    GEMM needs the frequency outermost, so the data is transposed twice; both
    copies are plain 2-D transposes (PyTorch's cache-blocked path).
    """
    c, p, f = xs.shape
    o = spec.shape[2] // 2
    # (C*P, F) complex = (C*P, 2F) real -> (2F, C*P): per frequency [re (C, P) | im (C, P)].
    xt = torch.empty(2 * f, c * p, dtype=torch.float32)
    xt.copy_(torch.view_as_real(xs).view(c * p, 2 * f).t())
    xt = xt.view(f, 2, c, p)
    # Y = re(X) @ top + im(X) @ bottom; X^T blocks are (C, P) with unit stride over P.
    ys = torch.bmm(xt[:, 0].transpose(1, 2), spec[:, :c])
    ys.baddbmm_(xt[:, 1].transpose(1, 2), spec[:, c:])  # (F, P, 2O)
    del xt
    ys = torch.view_as_complex(ys.view(f, p, o, 2))
    yt = torch.empty(p, o, f, dtype=ys.dtype)
    yt.view(p * o, f).copy_(ys.view(f, p * o).t())  # 2-D transpose -> (P, O, F)
    return yt


def _mix(xs: torch.Tensor, spec: torch.Tensor, o: int) -> torch.Tensor:
    """Mix with a spectrum in either form: packed (compiled op) or real-block (GEMMs)."""
    if spec.dim() == 6:
        return torch.ops.fastcount.spectral_mix(xs, spec, o)
    return _mix_gemm(xs, spec)


def spectral_mix(x: torch.Tensor, k: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
    """``out[p, o, f] = sum_c x[c, p, f] * k[f, c, o]``: the channel mixing of :class:`SpectralConv`.

    Args:
        x: (C, P, F) complex64, e.g. an rfft2 output of (C, tiles, T, T//2+1) viewed flat.
        k: (F, C, O) complex weight spectrum (e.g. :func:`kernel_spectrum`).
        compiled: True for the compiled op (``torch.ops.fastcount.spectral_mix``),
            False for the transpose + batched-GEMM path; None: the op when built.

    Returns (P, O, F) complex64, accumulated in float32. Repacks ``k`` on every call
    (SpectralConv caches the packed form per FFT size instead).
    """
    if x.dim() != 3 or k.dim() != 3 or k.shape[:2] != (x.shape[2], x.shape[0]):
        raise ValueError(f"x must be (C, P, F) and k (F, C, O); got {tuple(x.shape)} and {tuple(k.shape)}")
    if compiled is None:
        compiled = has_spectral_mix_op()
    elif compiled and not has_spectral_mix_op():
        raise RuntimeError("the compiled fastcount::spectral_mix op is not available (fastcount._C not built)")
    x = x.to(torch.complex64)
    spec = pack_spectrum(k) if compiled else _block_spectrum(k)
    return _mix(x, spec, k.shape[2])


class SpectralConv:
    """Inference form of one large valid conv + bias + LeakyReLU, NHWC in, NCHW out.

    Weight spectra are computed once per FFT size (in float64, then stored in
    float32) and cached (bounded LRU): packed for the compiled
    ``fastcount::spectral_mix`` op (:func:`pack_spectrum`) when it is built
    (``compiled``, default), else as the real 2x2-block form of conj(K) so the
    channel mixing is real batched GEMMs: xr @ [kr ki] + xi @ [-ki kr] = [yr yi],
    interleaved. The bias is added to the DC coefficient (``irfft2`` divides it
    by T*T), so the output pass only applies the LeakyReLU while cropping tiles
    into place.
    """

    MAX_CACHED = 3

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, slope: float, fft_size: int | None = None,
                 compiled: bool | None = None):
        if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"weight must be (O, C, k, k), got {tuple(weight.shape)}")
        self.weight = weight.detach().to("cpu", torch.float64)
        self.bias = bias.detach().to("cpu", torch.float64)
        self.out_channels, self.in_channels, self.kernel = (int(s) for s in weight.shape[:3])
        self.slope = float(slope)
        self.fft_size = None if fft_size is None else _check_fft_size(fft_size, self.kernel)
        if compiled and not has_spectral_mix_op():
            raise RuntimeError("compiled=True but the fastcount::spectral_mix op is not available")
        # The channel mixing: the compiled op when built (else transposes + batched GEMMs).
        self.compiled = has_spectral_mix_op() if compiled is None else bool(compiled)
        self._spectra: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def spectrum(self, t: int) -> torch.Tensor:
        """Cached float32 weight spectrum for FFT size ``t``, in the form ``self.compiled`` needs.

        Packed (:func:`pack_spectrum`) for the compiled op, else the (F, 2C, 2O)
        real-block form.

        At most ``MAX_CACHED`` sizes are kept (least recently used dropped): a
        spectrum can take a few hundred MB, and inputs of many shapes would
        otherwise accumulate one per FFT size.
        """
        with self._lock:
            s = self._spectra.pop(t, None)
            if s is None or (s.dim() == 6) != self.compiled:  # none yet, or built for the other path
                s = self._make_spectrum(t)
            self._spectra[t] = s  # re-insert: dict order is the recency order
            while len(self._spectra) > self.MAX_CACHED:
                self._spectra.pop(next(iter(self._spectra)))
        return s

    def _make_spectrum(self, t: int) -> torch.Tensor:
        k = kernel_spectrum(self.weight, t)  # (F, C, O) complex128
        return pack_spectrum(k) if self.compiled else _block_spectrum(k)

    def size_for(self, n: int, h: int, w: int) -> int:
        k = self.kernel
        if self.fft_size is not None:
            return self.fft_size
        return choose_fft_size(self.in_channels, self.out_channels, k, h - k + 1, w - k + 1, n)

    def __call__(self, x: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """x: (N, H, W, C) float32 or bfloat16, contiguous (NHWC) -> (N, O, H-k+1, W-k+1) float32.
        The FFTs and the mixing run in float32 either way. The result is channels_last
        (NHWC storage) with the compiled ops, else an NCHW (maybe strided) view.

        Every big copy is arranged as a plain 2-D transpose (PyTorch's
        cache-blocked path) or a copy with contiguous rows, and all tiles go
        through each step in one call (few ops: cheap under load). The channel
        mixing reads rfft2's output and writes irfft2's input layout directly
        (compiled op; the fallback transposes twice, see :func:`_mix_gemm`).
        """
        n, h, w, c = x.shape
        k, o = self.kernel, self.out_channels
        ho, wo = h - k + 1, w - k + 1
        t = self.size_for(n, h, w) if t is None else t
        b, ny, nx = _grid(ho, wo, k, t)
        tf = t // 2 + 1
        f, p = t * tf, n * ny * nx
        if self.compiled and has_gather_tiles_op():
            # One pass: NHWC (fp32 or bf16) -> the contiguous, zero-padded fp32 (C, P, t, t) tiles rfft2 reads.
            xs = torch.fft.rfft2(torch.ops.fastcount.gather_tiles(x, t, b, ny, nx))  # (C, P, t, tf)
        else:
            xs = _gather_rfft2(x.float(), t, b, ny, nx)
        yt = _mix(xs.view(c, p, f), self.spectrum(t), o)  # (P, O, F) complex64
        del xs
        yt[:, :, 0] += (self.bias * (t * t)).to(torch.float32)  # bias via the DC term: irfft2 divides by t*t
        y = torch.fft.irfft2(yt.view(p, o, t, tf), s=(t, t))  # (P, O, t, t)
        del yt
        # Crop each tile's valid b x b corner into place with the LeakyReLU, in one pass.
        if self.compiled and has_crop_tiles_op():
            # Straight to NHWC: what the next layer reads (returned as a channels_last NCHW view).
            return torch.ops.fastcount.crop_tiles(y, n, ny, nx, b, ho, wo, self.slope).permute(0, 3, 1, 2)
        y = y.view(n, ny, nx, o, t, t)[..., :b, :b].permute(0, 3, 1, 4, 2, 5)  # (N, O, ny, b, nx, b)
        out = torch.empty(n, o, ny * b, nx * b, dtype=torch.float32)
        torch._C._nn.leaky_relu(y, self.slope, out=out.view(n, o, ny, b, nx, b))
        return out[:, :, :ho, :wo]
