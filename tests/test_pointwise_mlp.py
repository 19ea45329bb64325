"""fastcount::pointwise_mlp (the fused 1x1 head of the CPU fast path) vs a float64 reference."""
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err

from fastcount.inference.cpu import _Head, _nhwc, build
from fastcount.inference.plan import fold
from fastcount.model import CountCeption
from fastcount.ops import has_compiled_ops

pytestmark = pytest.mark.skipif(not has_compiled_ops(), reason="fastcount._C is not built (compiled ops missing)")

# Fresh random inputs every run (the seed is in failure messages; FASTCOUNT_TEST_SEED replays one).
SEED = int(os.environ.get("FASTCOUNT_TEST_SEED", random.SystemRandom().randrange(2**31)))
ISAS = ("avx512", "avx2", "baseline")  # code paths of the op (FASTCOUNT_POINTWISE_MLP_ISA)
# float32 sums over <= 64 products per layer, three layers, vs float64: max |err| / max |ref|
TOL = 2e-6


def _layers(c, outs, salt):
    g = torch.Generator().manual_seed(SEED + salt)
    ws, bs = [], []
    for o in outs:
        ws.append(torch.randn(o, c, generator=g) / c ** 0.5)
        bs.append(torch.randn(o, generator=g))
        c = o
    return ws, bs, [0.01 + 0.1 * k for k in range(len(outs))]


def _reference(x, ws, bs, slopes):
    z = x.double()
    for w, b, s in zip(ws, bs, slopes):
        z = F.leaky_relu(z @ w.double().T + b.double(), s)
    return z


@pytest.mark.parametrize(
    "p,c,outs",
    [
        (1037, 32, (64, 64, 1)),  # the full-width head; pixels not a multiple of the 240-pixel block
        (240, 16, (32, 32, 1)),  # the default weights' head, exactly one block
        (7, 5, (3, 17, 2)),  # fewer pixels than a register tile; odd channel counts
        (481, 1, (48,)),  # one input channel; 48 = 3 vectors of 16 (a 2-vector tile, then a 1-vector one)
        (1, 80, (1,)),
    ],
)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_float64(p, c, outs, isa, monkeypatch):
    g = torch.Generator().manual_seed(SEED + p)
    x = torch.randn(p, c, generator=g) * 3
    ws, bs, slopes = _layers(c, outs, salt=p)
    monkeypatch.setenv("FASTCOUNT_POINTWISE_MLP_ISA", isa)
    try:
        y = torch.ops.fastcount.pointwise_mlp(x, ws, bs, slopes)
    except ValueError as e:
        assert "lacks" in str(e) and isa != "baseline", e
        pytest.skip(f"this CPU lacks {isa}: {e}")
    assert y.shape == (p, outs[-1]) and y.dtype == torch.float32
    assert rel_err(y, _reference(x, ws, bs, slopes)) < TOL, (isa, SEED)


def test_empty_noncontiguous_and_errors():
    ws, bs, slopes = _layers(6, (20, 2), salt=1)
    op = torch.ops.fastcount.pointwise_mlp
    assert op(torch.zeros(0, 6), ws, bs, slopes).shape == (0, 2)
    x = torch.randn(6, 300).T  # a transposed view: same values as its contiguous copy
    assert torch.equal(op(x, ws, bs, slopes), op(x.contiguous(), ws, bs, slopes))
    with pytest.raises(TypeError, match="float32"):
        op(x.double(), ws, bs, slopes)
    with pytest.raises(ValueError, match=r"weights\[1\] must be \(out, 20\)"):
        op(x, [ws[0], ws[1][:, :7]], bs, slopes)
    with pytest.raises(ValueError, match=r"biases\[0\]"):
        op(x, ws, [bs[0][:3], bs[1]], slopes)
    with pytest.raises(ValueError, match="one entry per layer"):
        op(x, ws, bs, slopes[:1])
    with pytest.raises(ValueError, match="FASTCOUNT_POINTWISE_MLP_ISA"):
        os.environ["FASTCOUNT_POINTWISE_MLP_ISA"] = "sse9"
        try:
            op(x, ws, bs, slopes)
        finally:
            del os.environ["FASTCOUNT_POINTWISE_MLP_ISA"]


@pytest.mark.parametrize("stride", [1, 4])
def test_backend_head_is_fused_and_equals_onednn(stride):
    torch.manual_seed(SEED % 1000)
    model = randomize_bn(CountCeption(width=0.25, stride=stride), seed=SEED % 1000).eval()
    backend = build(model, "fp32")
    assert backend.head.fused
    _, head = fold(model, torch.float64).to("cpu").split_head()
    onednn = _Head(head, torch.float32, fused=False)
    x = _nhwc(torch.randn(2, head[0].in_channels, 37, 29, generator=torch.Generator().manual_seed(SEED)))
    assert rel_err(backend.head(x), onednn(x)) < TOL, SEED
    assert backend.head(x).shape == onednn(x).shape
