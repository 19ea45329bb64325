"""The inference form of the FFT large convs (:class:`SpectralConv`), for the CPU fast path.

NHWC in, weight spectra cached per FFT size, bias folded into the DC term,
LeakyReLU in the output pass (overlap-save maths and the FFT size cost model:
:mod:`fastcount.inference.fft`).

- :class:`SpectralConv`: one large valid conv + bias + LeakyReLU.
- :func:`spectral_mix`: its per-frequency channel mixing, by the compiled CPU op
  ``torch.ops.fastcount.spectral_mix`` (reads rfft2's layout, writes irfft2's: no
  transposes) or, without the extension, by transposes and batched real GEMMs.
"""
from __future__ import annotations

import threading

import torch

from .._ext import has_compiled_ops
from .fft import check_fft_size, choose_fft_size, kernel_spectrum, tile_grid

__all__ = [
    "MIN_FFT_KERNEL",
    "SpectralConv",
    "spectral_mix",
    "pack_spectrum",
    "has_spectral_mix_op",
    "has_gather_tiles_op",
    "has_crop_tiles_op",
]

# Smallest large-conv kernel worth an FFT in inference; below it oneDNN's direct conv wins.
MIN_FFT_KERNEL = 5


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
        self.fft_size = None if fft_size is None else check_fft_size(fft_size, self.kernel)
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
        b, ny, nx = tile_grid(ho, wo, k, t)
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
