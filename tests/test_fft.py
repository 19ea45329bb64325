"""FFT overlap-save convolution vs F.conv2d: forward, gradients, module swap, inference form."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err

from fastcount.inference.fft import (
    FFTConv2d,
    SpectralConv,
    choose_fft_size,
    fft_conv2d,
    smooth_sizes,
    use_fft_convs,
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
