"""fastcount::winograd_conv3x3 (Winograd F(4x4, 3x3) for the Inception blocks) vs a float64 conv."""
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err

from fastcount.inference.cpu import _FP32_INCEPTION_NS, _fp32_inception_method, _Inception, _nhwc, build
from fastcount.inference.winograd import OUT_PAD, WinogradConv, transform_weights
from fastcount.inference.plan import fold
from fastcount.model import INCEPTION, CountCeption
from fastcount.ops import has_compiled_ops

pytestmark = pytest.mark.skipif(not has_compiled_ops(), reason="fastcount._C is not built (compiled ops missing)")

# Fresh random inputs every run (the seed is in failure messages; FASTCOUNT_TEST_SEED replays one).
SEED = int(os.environ.get("FASTCOUNT_TEST_SEED", random.SystemRandom().randrange(2**31)))
ISAS = ("avx512", "avx2", "baseline")  # code paths of the op (FASTCOUNT_WINOGRAD_ISA)
# F(4x4, 3x3) in float32 vs float64, max |err| / max |ref|: measured 1e-6..1.1e-5 for 5..160
# input channels (the transforms' coefficients up to 8 and 1/24 cost ~10x direct conv's error).
TOL = 3e-5


def _case(n, c, o, h, w, salt=0):
    g = torch.Generator().manual_seed(SEED + salt)
    x = _nhwc(torch.randn(n, c, h, w, generator=g) * 3)
    wt = torch.randn(o, c, 3, 3, generator=g) / (9 * c) ** 0.5
    b = torch.randn(o, generator=g)
    ref = F.leaky_relu(F.conv2d(x.double(), wt.double(), b.double(), padding=1), 0.05)
    return x, wt, b, ref


@pytest.mark.parametrize(
    "n,c,o,h,w",
    [
        (1, 40, 64, 23, 19),  # sides not multiples of the 4x4 tile; 40 = 16 + 16 + 8 input channels
        (2, 5, 7, 9, 13),  # a batch; channels in no vector width; fewer tiles per row than a work item
        (1, 3, 17, 1, 1),  # one pixel (all of its 3x3 window but the centre is padding)
        (1, 16, 48, 4, 101),  # one tile row; 101 columns = 26 tiles (two work items); 48 = 3 vectors
        (1, 80, 96, 30, 30),  # the full-width 80 -> (32, 96) block's channels
    ],
)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_float64_conv(n, c, o, h, w, isa, monkeypatch):
    x, wt, b, ref = _case(n, c, o, h, w, salt=c * 100 + o)
    conv = WinogradConv(wt, b, 0.05)
    monkeypatch.setenv("FASTCOUNT_WINOGRAD_ISA", isa)
    try:
        y = conv(x)
    except ValueError as e:
        assert "lacks" in str(e) and isa != "baseline", e
        pytest.skip(f"this CPU lacks {isa}: {e}")
    assert y.shape == (n, o, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) < TOL, (isa, SEED)


def test_transform_layout_and_errors():
    x, wt, b, _ = _case(1, 6, 20, 8, 8, salt=1)
    u, bp = transform_weights(wt, b)
    assert u.shape == (36, 6, 32) and bp.shape == (32,) and 32 % OUT_PAD == 0
    assert not u[:, :, 20:].any() and not bp[20:].any()  # zero past the real out channels
    op = torch.ops.fastcount.winograd_conv3x3
    xh = x.permute(0, 2, 3, 1)
    assert torch.equal(op(xh, u, bp, 20, 0.05), op(xh.contiguous(), u, bp, 20, 0.05))  # layout-agnostic
    assert op(xh[:, :0], u, bp, 20, 0.05).shape == (1, 0, 8, 20)
    with pytest.raises(ValueError, match="weight must be"):
        transform_weights(torch.randn(2, 3, 5, 5), torch.zeros(2))
    with pytest.raises(TypeError, match="float32"):
        op(xh.double(), u, bp, 20, 0.05)
    with pytest.raises(ValueError, match=r"u must be the transformed weights \(36, 6, 32\)"):
        op(xh, u[:, :5], bp, 20, 0.05)
    with pytest.raises(ValueError, match="bias must be"):
        op(xh, u, bp[:20], 20, 0.05)
    with pytest.raises(ValueError, match="FASTCOUNT_WINOGRAD_ISA"):
        os.environ["FASTCOUNT_WINOGRAD_ISA"] = "mmx"
        try:
            op(xh, u, bp, 20, 0.05)
        finally:
            del os.environ["FASTCOUNT_WINOGRAD_ISA"]


@pytest.mark.parametrize("n,h,w", [(1, 1, 1), (2, 17, 23), (1, 45, 38)])
def test_backend_all_winograd_matches_eager(n, h, w):
    """Every Inception block by Winograd: the count map still equals eager's (fp32 tolerance)."""
    torch.manual_seed(SEED % 1000)
    model = randomize_bn(CountCeption(width=0.25), seed=SEED % 1000).eval()
    backend = build(model, "fp32", winograd=True)
    assert set(backend.choice.inception) == {"winograd"}
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(SEED)) * 255
    with torch.inference_mode():
        ref = model(x)
    y = backend(x)
    assert y.shape == ref.shape and rel_err(y, ref) < 1e-4, SEED
    diff = (y.double().sum((1, 2, 3)) - ref.double().sum((1, 2, 3))).abs()
    assert float((diff / ref.double().abs().sum((1, 2, 3))).max()) < 1e-4, SEED


def test_every_inception_method_agrees():
    """Each block of the model in all four forms (oneDNN merged / split, Winograd merged / split)."""
    torch.manual_seed(SEED % 1000)
    model = randomize_bn(CountCeption(width=0.25), seed=SEED % 1000).eval()
    plan = fold(model, torch.float64).to("cpu")
    g = torch.Generator().manual_seed(SEED)
    blocks = [layer for role, layer in zip(plan.roles, plan.layers) if role == INCEPTION]
    assert blocks
    for layer in blocks:
        x = _nhwc(torch.randn(2, layer.branch3.in_channels, 13, 22, generator=g) * 5)
        ref = _Inception(layer, torch.float32, "split")(x)
        for method in _Inception.METHODS:
            y = _Inception(layer, torch.float32, method)(x)
            assert y.shape == ref.shape and rel_err(y, ref) < TOL, (method, SEED)


def test_method_choice_and_options(monkeypatch):
    # Clear-cut cases of the measured tables (benchmarks/cpu_inception_fit.py): 80 -> (32, 16)
    # is fastest as oneDNN 1x1 + Winograd 3x3 (AVX-512 61.9 vs >= 81.3 ns/px, AVX2 112.8 vs
    # >= 129.6), 48 -> (20, 20) in a Winograd form (42.4 vs >= 73.7; 79.3 vs >= 111.1), and on
    # AVX-512 12 -> (4, 4) as oneDNN's merged conv (8.2 vs >= 8.8).
    for isa in _FP32_INCEPTION_NS:
        assert set(_FP32_INCEPTION_NS[isa]) == set(_Inception.METHODS)
        monkeypatch.setattr("fastcount.inference.cpu._fp32_inception_isa", lambda isa=isa: isa)
        assert _fp32_inception_method(80, 32, 16) == "split_winograd", isa
        assert _fp32_inception_method(48, 20, 20) in ("winograd", "split_winograd"), isa
        if isa == "avx512":
            assert _fp32_inception_method(12, 4, 4) in ("merged", "split")
    monkeypatch.undo()
    model = CountCeption(width=0.25).eval()
    assert "winograd" not in build(model, "fp32", winograd=False).choice.inception
    assert "winograd" not in build(model, "fp32", merge=True).choice.inception
    with pytest.raises(ValueError, match="winograd must be"):
        build(model, "fp32", winograd="yes")
    with pytest.raises(ValueError, match="winograd=True needs precision='fp32'"):
        build(model, "bf16", winograd=True)
