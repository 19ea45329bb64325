"""Large-kernel convolution by FFT overlap-save: the shared maths, and the training form.

A valid (pad 0, stride 1) cross-correlation with a ``k x k`` kernel is cut into
output tiles of ``B = T - k + 1`` pixels; each tile reads a ``T x T`` input tile
(overlapping its neighbours by ``k - 1``). Per tile:

    Y(f) = X(f) @ conj(K(f))      (per frequency f: a (tiles x C) @ (C x O) matmul)

where ``X = rfft2(input tile)`` and ``K = rfft2(kernel zero-padded to T)``;
circular wrap-around only touches the ``k - 1`` rows/cols that are cropped.
The cost is a few FFT passes plus one batched matmul per frequency, instead of
``k*k*C*O`` multiply-adds per output pixel.

- :func:`choose_fft_size` / :func:`fft_cost`: the FFT size cost model (inference and training).
- :func:`fft_conv2d`: differentiable NCHW function (autograd through
  ``torch.fft``), the reference-compatible form used in training and tests.
- :class:`FFTConv2d`: an ``nn.Conv2d`` stand-in (same parameter names) built on it.
- :func:`use_fft_convs`: swap a CountCeption's large convs to/from FFTConv2d.

The inference form (NHWC, cached weight spectra, compiled mixing) is
:mod:`fastcount.inference.spectral`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model import LARGE

__all__ = [
    "smooth_sizes",
    "fft_cost",
    "choose_fft_size",
    "fft_conv2d",
    "FFTConv2d",
    "use_fft_convs",
    "kernel_spectrum",
    "tile_grid",
    "check_fft_size",
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


def tile_grid(out_h: int, out_w: int, k: int, t: int):
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
    b, ny, nx = tile_grid(out_h, out_w, k, t)
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


def check_fft_size(t: int, k: int) -> int:
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
        t = check_fft_size(fft_size, k)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, weight = x.to(dt), weight.to(dt)
    b, ny, nx = tile_grid(ho, wo, k, t)
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
        self.fft_size = None if fft_size is None else check_fft_size(fft_size, kernel_size)
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
        m.fft_size = None if fft_size is None else check_fft_size(fft_size, k)
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
