"""FFT overlap-save convolution vs F.conv2d: forward, gradients, module swap, inference form."""
import copy
import functools
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err

from fastcount.inference.fft import (
    FFTConv2d,
    choose_fft_size,
    fft_conv2d,
    kernel_spectrum,
    smooth_sizes,
    use_fft_convs,
)
from fastcount.inference.spectral import (
    _gather_rfft2,
    has_crop_tiles_op,
    has_gather_tiles_op,
    SpectralConv,
    has_spectral_mix_op,
    pack_spectrum,
    spectral_mix,
)
from fastcount.model import CountCeption


def _data(n, c, o, k, h, w, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    wt = torch.randn(o, c, k, k, generator=g, dtype=dtype) / k
    b = torch.randn(o, generator=g, dtype=dtype)
    return x, wt, b


@pytest.mark.parametrize(
    "n,c,o,k,h,w,t",
    [
        (1, 5, 3, 7, 23, 31, 16),  # tiles cut the map unevenly in both directions
        (2, 4, 6, 5, 19, 9, 8),  # tiny tiles: T = k + 3
        (1, 3, 2, 9, 9, 40, 27),  # one output row, non-power-of-2 FFT
        (3, 2, 2, 4, 13, 14, 64),  # one tile larger than the whole map
        (1, 6, 4, 7, 37, 29, None),  # cost-model choice
    ],
)
def test_fft_conv2d_forward_matches_conv2d(n, c, o, k, h, w, t):
    x, wt, b = _data(n, c, o, k, h, w)
    ref = F.conv2d(x.double(), wt.double(), b.double())
    y = fft_conv2d(x, wt, b, fft_size=t)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5
    assert rel_err(fft_conv2d(x.double(), wt.double(), None, fft_size=t), ref - b.double()[:, None, None]) < 1e-12


@pytest.mark.parametrize("t", [12, 20, None])
def test_fft_conv2d_gradients_match_conv2d(t):
    x, wt, b = _data(2, 4, 3, 6, 17, 21, seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(2, 3, 12, 16, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda *a: F.conv2d(*a), lambda *a: fft_conv2d(*a, fft_size=t)):
        xs, ws, bs = (v.clone().requires_grad_() for v in (x, wt, b))
        (fn(xs, ws, bs) * gy).sum().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for got, ref in zip(grads[1], grads[0]):
        assert rel_err(got, ref) < 1e-10


def test_fft_conv2d_float32_gradients():
    x, wt, b = _data(1, 8, 4, 9, 30, 26, seed=3)
    outs = []
    for fn in (F.conv2d, fft_conv2d):
        xs, ws, bs = (v.clone().requires_grad_() for v in (x, wt, b))
        fn(xs, ws, bs).square().mean().backward()
        outs.append((xs.grad, ws.grad, bs.grad))
    for got, ref in zip(outs[1], outs[0]):
        assert rel_err(got, ref) < 1e-4


def test_fft_conv2d_rejects_bad_arguments():
    x, wt, b = _data(1, 3, 2, 5, 10, 10)
    with pytest.raises(ValueError, match="fft_size"):
        fft_conv2d(x, wt, b, fft_size=5)
    with pytest.raises(ValueError, match="smaller than the 5x5 kernel"):
        fft_conv2d(x[..., :4], wt, b)
    with pytest.raises(ValueError, match="matching C"):
        fft_conv2d(x[:, :2], wt, b)


def test_choose_fft_size_is_smooth_and_larger_than_kernel():
    assert smooth_sizes(20, 33) == [20, 24, 25, 27, 30, 32]
    for c, o, k, h, w in [(48, 16, 14, 305, 305), (128, 32, 18, 288, 288), (128, 32, 18, 33, 33), (3, 2, 5, 1, 1)]:
        t = choose_fft_size(c, o, k, h, w)
        assert t > k and smooth_sizes(t, t) == [t]


def test_fft_module_swap_keeps_parameters_and_outputs():
    torch.manual_seed(0)
    # eval mode: BN is an affine, so every gradient is non-trivial (in train mode the
    # conv biases before BN get mathematically zero gradients, i.e. rounding noise)
    model = randomize_bn(CountCeption(width=0.125)).eval()
    x = torch.rand(2, 3, 11, 13) * 255
    keys = list(model.state_dict())
    ref_train = copy.deepcopy(model).train()(x).detach()  # a copy: train mode updates BN statistics
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    params = list(model.parameters())
    use_fft_convs(model)
    assert sum(isinstance(m, FFTConv2d) for m in model.modules()) == 2
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params))
    assert rel_err(copy.deepcopy(model).train()(x).detach(), ref_train) < 1e-4
    y = model(x)
    assert rel_err(y.detach(), ref.detach()) < 1e-4
    y.sum().backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[n]) < 1e-3, n
    use_fft_convs(model, False)
    assert not any(isinstance(m, FFTConv2d) for m in model.modules())
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params))


@pytest.mark.parametrize("t", [16, 25, None])
def test_spectral_conv_nhwc_matches_conv_bias_leaky(t):
    x, wt, b = _data(2, 6, 5, 8, 29, 19, seed=4)
    ref = F.leaky_relu(F.conv2d(x.double(), wt.double(), b.double()), 0.01)
    sc = SpectralConv(wt, b, 0.01, fft_size=t)
    xh = x.permute(0, 2, 3, 1).contiguous()
    before = xh.clone()
    y = sc(xh)
    assert torch.equal(xh, before)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5
    if t is not None:
        assert list(sc._spectra) == [t]  # spectrum cached once per FFT size
        sc(xh)
        assert len(sc._spectra) == 1


def test_training_with_fft_matches_plain_training():
    from conftest import DATASETS

    from fastcount.cli import build_parser
    from fastcount.data import load_dataset
    from fastcount.train import TrainConfig, train

    ds = load_dataset("vgg_cells", DATASETS)
    cfg = TrainConfig(n_train=2, n_val=1, epochs=2, crop=40, width=0.0625, batch_size=2, seed=0, lr=1e-3)
    runs = [train(ds, cfg, progress=False, log=lambda s: None, fft=f) for f in (False, True)]
    for a, b in zip(runs[0].history, runs[1].history):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * abs(a["train_loss"])
    assert not any(isinstance(m, FFTConv2d) for m in runs[1].model.modules())  # a plain CountCeption comes back
    # conv weights follow the same trajectory (conv biases before train-mode BN have zero true
    # gradient: Adam turns their rounding noise into lr-sized steps, so they are not compared)
    for (n, p), (_, q) in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().items()):
        if p.dim() == 4:
            assert rel_err(q, p) < 1e-2, n
    args = build_parser().parse_args(["train", "--dataset", "vgg_cells", "--data-root", "x", "--out", "o", "--fft"])
    assert args.fft is True
    with pytest.raises(ValueError, match="fft must be a bool"):
        train(ds, cfg, progress=False, fft="yes")


def test_spectral_conv_cache_is_bounded():
    x, wt, b = _data(1, 3, 2, 5, 20, 20, seed=5)
    sc = SpectralConv(wt, b, 0.01)
    xh = x.permute(0, 2, 3, 1).contiguous()
    ref = F.leaky_relu(F.conv2d(x, wt, b), 0.01)
    for t in (8, 9, 10, 12, 15, 8):
        assert rel_err(sc(xh, t), ref) < 1e-5
    assert list(sc._spectra) == [10, 12, 15, 8][-SpectralConv.MAX_CACHED:]


# --------------------------------------------------------------------------- spectral_mix
# Fresh random inputs every run (the seed is in failure messages; FASTCOUNT_TEST_SEED replays one).
SEED = int(os.environ.get("FASTCOUNT_TEST_SEED", random.SystemRandom().randrange(2**31)))
MIX_ISAS = ("avx512", "avx2", "baseline")  # code paths of the compiled op (FASTCOUNT_SPECTRAL_MIX_ISA)
# float32 accumulation over C complex products, vs a float64 reference: max |err| / max |ref|
MIX_TOL = 1e-5


def _spectra(c, p, o, f, salt=0):
    g = torch.Generator().manual_seed(SEED + salt)
    x = torch.randn(c, p, f, dtype=torch.complex64, generator=g)
    k = torch.randn(f, c, o, dtype=torch.complex128, generator=g)
    return x, k


def _mix_reference(x, k):
    return torch.einsum("cpf,fco->pof", x.to(torch.complex128), k.to(torch.complex128))


@functools.lru_cache(maxsize=None)
def _mix_case(c, p, o, f):
    """Inputs and float64 reference, computed once per shape for all the ISAs."""
    x, k = _spectra(c, p, o, f, salt=c * 1000 + f)
    return x, k, _mix_reference(x, k)


def test_spectral_mix_op_is_built():
    # CI builds the extension: the compiled path must be what SpectralConv uses by default.
    assert has_spectral_mix_op(), "fastcount._C lacks fastcount::spectral_mix (rebuild the extension)"
    wt = torch.randn(2, 3, 5, 5)
    assert SpectralConv(wt, torch.zeros(2), 0.01).compiled


@pytest.mark.parametrize(
    "c,p,o,f",
    [
        (7, 5, 3, 37),  # nothing a multiple of the 16-frequency block, 4-channel group or 3-tile item
        (1, 1, 1, 1),
        (5, 4, 7, 16),  # exactly one frequency block
        (3, 7, 9, 33),  # one frequency past a block; O = 2 groups + 1
        (48, 36, 16, 211),  # the 14x14 layer's channels
        (128, 25, 32, 405),  # the 18x18 layer's channels and tile count (F cut down)
    ],
)
@pytest.mark.parametrize("isa", MIX_ISAS)
def test_spectral_mix_matches_float64_einsum(c, p, o, f, isa, monkeypatch):
    x, k, ref = _mix_case(c, p, o, f)
    monkeypatch.setenv("FASTCOUNT_SPECTRAL_MIX_ISA", isa)
    try:
        y = spectral_mix(x, k, compiled=True)
    except ValueError as e:
        assert "lacks" in str(e) and isa != "baseline", e
        pytest.skip(f"this CPU lacks {isa}: {e}")
    assert y.shape == (p, o, f) and y.dtype == torch.complex64
    assert rel_err(torch.view_as_real(y), torch.view_as_real(ref)) < MIX_TOL, (isa, SEED)
    if isa == "baseline":  # once per shape (baseline always runs):
        monkeypatch.delenv("FASTCOUNT_SPECTRAL_MIX_ISA")
        # the default (best) path and the pure-PyTorch fallback agree with the reference and each other
        y = spectral_mix(x, k)
        fb = spectral_mix(x, k, compiled=False)
        assert rel_err(torch.view_as_real(fb), torch.view_as_real(ref)) < MIX_TOL, SEED
        assert rel_err(torch.view_as_real(y), torch.view_as_real(fb)) < 2 * MIX_TOL, SEED


def test_spectral_mix_op_layouts_and_errors():
    x, k = _spectra(6, 4, 5, 40, salt=1)
    kp = pack_spectrum(k)
    assert kp.shape == (3, 2, 6, 4, 2, 16) and kp.dtype == torch.float32
    # zero padding past F and past O
    assert not kp[2, :, :, :, :, 8:].any() and not kp[:, 1, :, 1:].any()
    ref = _mix_reference(x, k)
    op = torch.ops.fastcount.spectral_mix
    # a non-contiguous x (a transposed view of the same values) gives the same result
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert rel_err(torch.view_as_real(op(xt, kp, 5)), torch.view_as_real(ref)) < MIX_TOL, SEED
    # zero input channels: all zeros; zero tiles: empty
    assert torch.equal(op(x[:0], pack_spectrum(k[:, :0]), 5), torch.zeros(4, 5, 40, dtype=torch.complex64))
    assert op(x[:, :0], kp, 5).shape == (0, 5, 40)
    with pytest.raises(TypeError, match="complex64"):
        op(x.to(torch.complex128), kp, 5)
    with pytest.raises(TypeError, match="float32"):
        op(x, kp.double(), 5)
    with pytest.raises(ValueError, match="packed spectrum"):
        op(x, kp, 9)  # 9 channels need 3 groups of 4
    with pytest.raises(ValueError, match="packed spectrum"):
        op(x[:, :, :30], kp, 5)  # F = 30: two blocks, not three
    with pytest.raises(ValueError, match=r"\(C, P, F\)"):
        op(x[0], kp, 5)
    with pytest.raises(ValueError, match="x must be"):
        spectral_mix(x, k[:, :5])
    # shape-only (fake/meta) kernel
    m = op(x.to("meta"), kp.to("meta"), 5)
    assert m.shape == (4, 5, 40) and m.dtype == torch.complex64
    torch.library.opcheck(op.default, (x, kp, 5))  # schema, fake kernel, dispatcher registration


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(
    "n,c,o,k,h,w,t",
    [
        (2, 6, 5, 8, 29, 19, 25),
        (1, 128, 32, 18, 45, 38, 25),  # the 18x18 layer's channels, 3 x 2 tiles
        (1, 48, 16, 14, 33, 40, None),  # the 14x14 layer's channels, cost-model size
    ],
)
def test_spectral_conv_compiled_and_fallback_match_conv(n, c, o, k, h, w, t, compiled):
    x, wt, b = _data(n, c, o, k, h, w, seed=SEED % 1000)
    ref = F.leaky_relu(F.conv2d(x.double(), wt.double(), b.double()), 0.01)
    sc = SpectralConv(wt, b, 0.01, fft_size=t, compiled=compiled)
    assert sc.compiled is compiled
    y = sc(x.permute(0, 2, 3, 1).contiguous())
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5, SEED
    (tt,) = sc._spectra
    assert sc._spectra[tt].dim() == (6 if compiled else 3)  # packed for the op, real-block for GEMMs
    sc.compiled = not compiled  # switching paths rebuilds the cached spectrum in the other form
    assert rel_err(sc(x.permute(0, 2, 3, 1).contiguous()), ref) < 1e-5, SEED
    assert list(sc._spectra) == [tt] and sc._spectra[tt].dim() == (3 if compiled else 6)


def test_spectral_conv_compiled_matches_model_map():
    """Full network through the cpu backend (SpectralConv with the op): map relative error < 1e-4."""
    from fastcount.inference.cpu import build

    torch.manual_seed(SEED)
    model = randomize_bn(CountCeption(width=0.25)).eval()
    x = torch.rand(1, 3, 70, 61) * 255
    with torch.inference_mode():
        ref = model.double()(x.double())
        be = build(model.float(), "fp32", large="fft")
        ffts = [op.fft for op in be.ops if getattr(op, "method", None) == "fft"]
        assert len(ffts) == 2 and all(f.compiled for f in ffts)
        y = be(x)
    assert rel_err(y, ref) < 1e-4, SEED


def test_spectral_conv_without_extension_uses_gemm_fallback(tmp_path):
    """Without fastcount._C, SpectralConv runs the pure-PyTorch transpose + GEMM mixing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['fastcount._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch, torch.nn.functional as F\n"
        "from fastcount.inference.spectral import SpectralConv, has_spectral_mix_op, spectral_mix\n"
        "assert not has_spectral_mix_op()\n"
        "g = torch.Generator().manual_seed(%d)\n"
        "x, w, b = torch.randn(1, 5, 23, 20, generator=g), torch.randn(3, 5, 6, 6, generator=g) / 6, torch.randn(3, generator=g)\n"
        "sc = SpectralConv(w, b, 0.01, fft_size=16)\n"
        "assert not sc.compiled\n"
        "y = sc(x.permute(0, 2, 3, 1).contiguous())\n"
        "ref = F.leaky_relu(F.conv2d(x.double(), w.double(), b.double()), 0.01)\n"
        "assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5\n"
        "for bad in (lambda: SpectralConv(w, b, 0.01, compiled=True), lambda: spectral_mix(torch.zeros(2, 1, 3, dtype=torch.complex64), torch.zeros(3, 2, 1, dtype=torch.complex64), compiled=True)):\n"
        "    try:\n"
        "        bad()\n"
        "    except RuntimeError as e:\n"
        "        assert 'not available' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('compiled=True without the extension must raise')\n"
    ) % (SEED % 1000)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert res.returncode == 0, res.stderr



def _tiles_reference(x, t, step, ny, nx):
    """Plain loops: out[c, p, ty, tx] = x[n, iy*step+ty, ix*step+tx, c], 0 outside (float64)."""
    n, h, w, c = x.shape
    out = torch.zeros(c, n * ny * nx, t, t, dtype=torch.float64)
    for ni in range(n):
        for iy in range(ny):
            for ix in range(nx):
                pi = (ni * ny + iy) * nx + ix
                y0, x0 = iy * step, ix * step
                blk = x[ni, y0 : y0 + t, x0 : x0 + t].permute(2, 0, 1)
                out[:, pi, : blk.shape[1], : blk.shape[2]] = blk
    return out


@pytest.mark.parametrize(
    "n,h,w,c,t,step",
    [
        (1, 1, 1, 1, 1, 1),
        (2, 37, 41, 5, 16, 7),  # edge tiles run past the image on both axes
        (3, 10, 13, 17, 8, 5),  # C not a multiple of the 16-channel block
        (1, 19, 19, 3, 19, 1),  # tiles larger than most of the image
        (1, 40, 23, 33, 12, 12),  # no overlap (step = t)
        (1, 30, 70, 20, 36, 23),  # tile rows of 3 pixel blocks (16 + 16 + 4), 2 channel blocks
    ],
)
def test_gather_tiles_op_matches_reference(n, h, w, c, t, step):
    assert has_gather_tiles_op(), "fastcount._C lacks fastcount::gather_tiles (rebuild the extension)"
    g = torch.Generator().manual_seed(SEED + h * w)
    x = torch.randn(n, h, w, c, generator=g)
    ny, nx = -(-h // step), -(-w // step)
    got = torch.ops.fastcount.gather_tiles(x, t, step, ny, nx)
    assert got.shape == (c, n * ny * nx, t, t) and got.is_contiguous()
    assert torch.equal(got.double(), _tiles_reference(x.double(), t, step, ny, nx)), SEED  # a copy: exact
    xb = x.to(torch.bfloat16)  # the bf16 pipeline's input: widened exactly, tiles are float32
    gotb = torch.ops.fastcount.gather_tiles(xb, t, step, ny, nx)
    assert gotb.dtype == torch.float32
    assert torch.equal(gotb.double(), _tiles_reference(xb.double(), t, step, ny, nx)), SEED
    # the same spectra as the pure-PyTorch path SpectralConv falls back to
    ref = _gather_rfft2(x, t, step, ny, nx)
    assert rel_err(torch.view_as_real(torch.fft.rfft2(got)), torch.view_as_real(ref)) < 1e-6, SEED


def test_gather_tiles_op_errors_and_fake_kernel():
    op = torch.ops.fastcount.gather_tiles
    with pytest.raises(RuntimeError, match="float32 or bfloat16 \\(N, H, W, C\\)"):
        op(torch.zeros(2, 3, 4), 4, 2, 1, 1)
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.zeros(1, 4, 4, 2, dtype=torch.float64), 4, 2, 1, 1)
    with pytest.raises(RuntimeError, match="positive"):
        op(torch.zeros(1, 4, 4, 2), 0, 2, 1, 1)
    # a non-contiguous (channels_last view) input is read correctly
    x = torch.randn(1, 3, 9, 11).permute(0, 2, 3, 1)  # (N, H, W, C) view of NCHW storage
    assert torch.equal(op(x, 5, 4, 3, 3), op(x.contiguous(), 5, 4, 3, 3))
    torch.library.opcheck(op.default, (torch.randn(2, 9, 7, 3), 4, 3, 3, 3))
    torch.library.opcheck(op.default, (torch.randn(2, 9, 7, 3).to(torch.bfloat16), 4, 3, 3, 3))


def test_spectral_conv_with_and_without_gather_op(monkeypatch):
    import fastcount.inference.spectral as fft_mod

    g = torch.Generator().manual_seed(SEED + 7)
    x = torch.randn(2, 45, 38, 6, generator=g)
    wt, b = torch.randn(4, 6, 14, 14, generator=g) * 0.05, torch.randn(4, generator=g)
    conv = SpectralConv(wt, b, 0.01)
    ref = F.leaky_relu(F.conv2d(x.permute(0, 3, 1, 2).double(), wt.double(), b.double()), 0.01)
    y_op = conv(x, 24)
    monkeypatch.setattr(fft_mod, "has_gather_tiles_op", lambda: False)
    y_fb = conv(x, 24)
    assert rel_err(y_op, ref) < 1e-5 and rel_err(y_fb, ref) < 1e-5, SEED


def _crop_reference(tiles, n, ny, nx, b, height, width, slope):
    """Loop-free reference of fastcount::crop_tiles: NHWC, LeakyReLU'd valid corners."""
    p, o, t, _ = tiles.shape
    y = tiles.view(n, ny, nx, o, t, t)[..., :b, :b].permute(0, 1, 4, 2, 5, 3)  # (N, ny, b, nx, b, O)
    y = y.reshape(n, ny * b, nx * b, o)[:, :height, :width]
    return F.leaky_relu(y, slope)


@pytest.mark.parametrize(
    "n,ny,nx,b,t,o,height,width",
    [
        (1, 1, 1, 1, 1, 1, 1, 1),
        (2, 3, 4, 7, 12, 5, 19, 25),  # partial last tiles on both axes
        (1, 2, 2, 21, 30, 33, 40, 37),  # runs of 16 columns straddle tile edges; O not a multiple of anything
        (3, 1, 3, 9, 9, 2, 9, 17),  # b == t
        (1, 2, 1, 5, 8, 3, 0, 4),  # empty output
    ],
)
def test_crop_tiles_op_matches_reference(n, ny, nx, b, t, o, height, width):
    assert has_crop_tiles_op(), "fastcount._C lacks fastcount::crop_tiles (rebuild the extension)"
    g = torch.Generator().manual_seed(SEED + b * t + o)
    tiles = torch.randn(n * ny * nx, o, t, t, generator=g)
    got = torch.ops.fastcount.crop_tiles(tiles, n, ny, nx, b, height, width, 0.07)
    assert got.shape == (n, height, width, o) and got.is_contiguous()
    assert torch.equal(got, _crop_reference(tiles, n, ny, nx, b, height, width, 0.07)), SEED


def test_crop_tiles_op_errors_and_fake_kernel():
    op = torch.ops.fastcount.crop_tiles
    tiles = torch.randn(4, 3, 6, 6)
    with pytest.raises(RuntimeError, match="float32 \\(P, O, t, t\\)"):
        op(tiles.double(), 1, 2, 2, 5, 10, 10, 0.01)
    with pytest.raises(RuntimeError, match="expected n\\*ny\\*nx"):
        op(tiles, 1, 2, 3, 5, 10, 10, 0.01)
    with pytest.raises(RuntimeError, match="covering it"):
        op(tiles, 1, 2, 2, 5, 11, 10, 0.01)
    with pytest.raises(RuntimeError, match="must be positive"):
        op(tiles, 1, 2, 2, 0, 10, 10, 0.01)
    torch.library.opcheck(op.default, (tiles, 1, 2, 2, 5, 9, 7, 0.01))


def test_spectral_conv_with_and_without_crop_op(monkeypatch):
    import fastcount.inference.spectral as fft_mod

    g = torch.Generator().manual_seed(SEED + 11)
    x = torch.randn(2, 47, 39, 7, generator=g)
    wt, b = torch.randn(5, 7, 14, 14, generator=g) * 0.05, torch.randn(5, generator=g)
    conv = SpectralConv(wt, b, 0.01)
    ref = F.leaky_relu(F.conv2d(x.permute(0, 3, 1, 2).double(), wt.double(), b.double()), 0.01)
    y_op = conv(x, 25)
    assert y_op.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(fft_mod, "has_crop_tiles_op", lambda: False)
    y_fb = conv(x, 25)
    assert y_fb.shape == y_op.shape == ref.shape
    assert rel_err(y_op, ref) < 1e-5 and rel_err(y_fb, ref) < 1e-5, SEED
    assert torch.equal(y_op, y_fb)  # same spectra, same crop: identical
    # the bf16 pipeline feeds bf16 activations: widened exactly by the gather
    xb = x.to(torch.bfloat16)
    refb = F.leaky_relu(F.conv2d(xb.permute(0, 3, 1, 2).double(), wt.double(), b.double()), 0.01)
    assert rel_err(conv(xb, 25), refb) < 1e-5, SEED


def test_fft_size_candidates_and_choice():
    from fastcount.inference.fft import _fast_fft_size

    assert [t for t in range(2, 130) if _fast_fft_size(t)] == [10, 20, 30, 40, 60, 80, 120]
    # the full-width layers at 256x256 and 1024x1024 input: the fitted model picks T = 120
    assert choose_fft_size(48, 16, 14, 305, 305) == 120
    assert choose_fft_size(128, 32, 18, 288, 288) == 120
    assert choose_fft_size(128, 32, 18, 1056, 1056) == 120
    # training weighs the per-step weight transforms: smaller tiles
    assert choose_fft_size(128, 32, 18, 288, 288, 1, 8.0) < 120
    # tiny maps: any valid size (> k), including non-candidates when no candidate fits
    for k, out in [(14, 1), (18, 3), (5, 2), (18, 40)]:
        assert choose_fft_size(8, 4, k, out, out) > k
