"""Each Triton kernel vs its PyTorch reference (conv + BN + LeakyReLU modules
in float64) on fresh random inputs with randomised BN statistics, at sizes
that are not multiples of the blocks. fp32, relative error < 1e-4.

Without CUDA the kernels run through Triton's interpreter (conftest sets
TRITON_INTERPRET=1); shapes are small so the file runs in well under a minute.
"""
import pytest
import torch

from conftest import HAS_CUDA, gpu, randomize_bn, rel_err
from fastcount.inference.plan import FoldedConv, FoldedInception, fold_conv
from fastcount.kernels import conv_bn_lrelu as kconv
from fastcount.kernels import head as khead
from fastcount.kernels import inception as kinc
from fastcount.kernels import pad_channels
from fastcount.model import ConvBNAct, Inception

DEV = "cuda" if HAS_CUDA else "cpu"
TOL = 1e-4
# Small pinned blocks force several programs along every GEMM dimension, so
# tails of M, N and K (none a multiple of 16 here) are all exercised.
SMALL_CONV = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}


def _nhwc(x):
    return x.permute(0, 2, 3, 1)


def _nchw(y):
    return y.permute(0, 3, 1, 2)


def _block(cin, cout, k, pad, stride=1, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ConvBNAct(cin, cout, k, pad, stride), seed=seed).eval()


def _x(n, c, h, w, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g) * scale).to(DEV)


@torch.no_grad()
def _ref(module, x):
    return module.double().to(x.device)(x.double())


_CONV_CASES = [
    (3, 20, 3, 7, 1, 13, 21),  # the first conv: 3 channels, padding larger than the kernel
    (12, 17, 14, 0, 1, 19, 23),  # 14x14 valid
    (40, 33, 18, 0, 1, 20, 25),  # 18x18 valid, C_in and C_out not multiples of 16
    (18, 9, 18, 0, 3, 22, 27),  # 18x18 at output stride 3 (the strided head folded in)
    (5, 7, 1, 0, 2, 13, 21),  # 1x1 strided
    (32, 24, 3, 1, 1, 13, 21),  # C_in a multiple of BLOCK_K: the unmasked-channel path, padded
    (16, 20, 14, 0, 1, 17, 19),  # ... and valid
]


# The 18x18 cases run only with default blocks: pinned 16-wide blocks would
# cost ~30 s in the interpreter and exercise the same code as the 14x14 case.
@pytest.mark.parametrize(
    "cin,cout,k,pad,stride,h,w,blocks",
    [(*c, None) for c in _CONV_CASES] + [(*c, SMALL_CONV) for c in _CONV_CASES if c[2] != 18],
)
def test_conv_bn_lrelu_matches_reference(cin, cout, k, pad, stride, h, w, blocks):
    block = _block(cin, cout, k, pad, stride)
    x = _x(2, cin, h, w, scale=3.0)
    cw = kconv.prepare(_folded(block))
    y = _nchw(kconv.conv_bn_lrelu(_nhwc(x), cw, blocks=blocks))
    ref = _ref(block, x)
    assert y.shape == ref.shape
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < TOL


def _folded(block) -> FoldedConv:
    f = fold_conv(block)
    return FoldedConv(f.weight.float().to(DEV), f.bias.float().to(DEV), f.kernel, f.padding, f.stride, f.slope)


def test_conv_reads_nchw_and_writes_into_strided_out():
    """The backend feeds the NCHW input as a permuted view and kernels may write
    into any strided ``out`` (here: a channel slice of a wider NCHW buffer)."""
    block = _block(3, 19, 3, 4)
    x = _x(2, 3, 11, 17, scale=100.0)
    cw = kconv.prepare(_folded(block))
    buf = torch.full((2, 25, 17, 23), 7.0, device=DEV)
    kconv.conv_bn_lrelu(_nhwc(x), cw, out=_nhwc(buf[:, 3:22]), blocks=SMALL_CONV)
    assert rel_err(buf[:, 3:22], _ref(block, x)) < TOL
    assert (buf[:, :3] == 7).all() and (buf[:, 22:] == 7).all()


@pytest.mark.parametrize(
    "cin,a,b,h,w",
    [(20, 5, 7, 13, 21), (40, 28, 12, 9, 11), (17, 16, 33, 7, 13)],
)
@pytest.mark.parametrize("blocks", [None, {"BLOCK_M": 32, "BLOCK_K": 16}], ids=["default", "small"])
def test_inception_matches_reference(cin, a, b, h, w, blocks):
    torch.manual_seed(2)
    block = randomize_bn(Inception(cin, a, b), seed=3).eval()
    x = _x(2, cin, h, w, seed=4, scale=2.0)
    iw = kinc.prepare(FoldedInception(_folded(block.branch1), _folded(block.branch3)))
    y = _nchw(kinc.inception(_nhwc(x), iw, blocks=blocks))
    ref = _ref(block, x)
    assert y.shape == ref.shape == (2, a + b, h, w)
    assert rel_err(y[:, :a], ref[:, :a]) < TOL  # 1x1 branch, channels first
    assert rel_err(y[:, a:], ref[:, a:]) < TOL  # 3x3 branch with its zero-padded border


def _head_blocks(c0, c1, c2, stride):
    torch.manual_seed(5)
    mods = [_block(c0, c1, 1, 0, seed=5), _block(c1, c2, 1, 0, seed=6), _block(c2, 1, 1, 0, stride, seed=7)]
    return mods, khead.prepare([_folded(m) for m in mods])


@pytest.mark.parametrize("c0,c1,c2,stride,h,w", [(32, 64, 64, 1, 13, 21), (5, 9, 17, 2, 13, 21), (12, 33, 20, 3, 10, 19)])
@pytest.mark.parametrize("blocks", [None, {"BLOCK_M": 16}], ids=["default", "small"])
def test_head_matches_reference_and_sums(c0, c1, c2, stride, h, w, blocks):
    mods, hw = _head_blocks(c0, c1, c2, stride)
    x = _x(2, c0, h, w, seed=8, scale=2.0)
    y, sums = khead.head(_nhwc(x), hw, emit_sums=True, blocks=blocks)
    ref = _ref(torch.nn.Sequential(*mods), x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < TOL
    totals = sums.double().sum(dim=1)
    expect = ref.sum(dim=(1, 2, 3))
    assert torch.allclose(totals.cpu(), expect.cpu(), rtol=1e-5, atol=1e-5 * float(ref.abs().sum()))
    if blocks is not None:  # tiles never straddle images: one row of partial sums per image
        assert sums.shape == (2, -(-(y.shape[2] * y.shape[3]) // blocks["BLOCK_M"]))
    assert torch.equal(khead.head(_nhwc(x), hw, blocks=blocks), y)


def test_gemm_weight_layout():
    block = _block(5, 7, 3, 1)
    f = fold_conv(block)
    w = f.gemm_weight(16, 32)
    assert w.shape == (9 * 16, 32)
    w4 = w.reshape(3, 3, 16, 32)
    assert torch.equal(w4[:, :, :5, :7], f.weight.permute(2, 3, 1, 0))
    assert (w4[:, :, 5:] == 0).all() and (w4[..., 7:] == 0).all()
    assert f.padded_bias(32)[:7].equal(f.bias) and (f.padded_bias(32)[7:] == 0).all()
    with pytest.raises(ValueError, match="cin_pad"):
        f.gemm_weight(4, 32)


def test_pad_channels():
    assert [pad_channels(c) for c in (1, 16, 17, 48, 64, 112, 160)] == [16, 16, 32, 64, 64, 128, 256]


def test_kernel_argument_errors():
    cw = kconv.prepare(_folded(_block(4, 6, 3, 1)))
    x = _x(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"x must be an NHWC tensor \(N, H, W, 4\)"):
        kconv.conv_bn_lrelu(x, cw)  # NCHW passed where NHWC expected
    with pytest.raises(ValueError, match="out must have shape"):
        kconv.conv_bn_lrelu(_nhwc(x), cw, out=torch.empty(1, 8, 8, 5, device=DEV))
    with pytest.raises(ValueError, match="too small"):
        kconv.conv_bn_lrelu(_nhwc(x), kconv.prepare(_folded(_block(4, 6, 14, 0))))
    with pytest.raises(TypeError, match="floating"):
        kconv.conv_bn_lrelu(_nhwc(x).to(torch.int32), cw)
    with pytest.raises(ValueError, match="1 output channel"):
        khead.prepare([_folded(_block(4, 8, 1, 0)), _folded(_block(8, 8, 1, 0)), _folded(_block(8, 2, 1, 0))])
    with pytest.raises(ValueError, match="1x1 .* 3x3"):
        kinc.prepare(FoldedInception(_folded(_block(4, 6, 3, 1)), _folded(_block(4, 6, 3, 1))))


# ---------------------------------------------------------------- GPU only
# Reduced precision (bf16/fp16 weights and activations, fp32 accumulation) and
# TF32: relative error < 2e-2 vs the float64 reference (bf16 has an 8-bit mantissa).
@gpu
@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)])
def test_kernels_reduced_precision_on_gpu(dtype, tf32):
    block = _block(48, 16, 14, 0)
    x = _x(2, 48, 45, 53, scale=2.0)
    y = _nchw(kconv.conv_bn_lrelu(_nhwc(x).to(dtype), kconv.prepare(_folded(block), dtype), tf32=tf32))
    assert y.dtype == dtype and rel_err(y, _ref(block, x)) < 2e-2

    torch.manual_seed(2)
    inc = randomize_bn(Inception(16, 112, 48), seed=3).eval()
    x = _x(2, 16, 61, 67, seed=4, scale=2.0)
    iw = kinc.prepare(FoldedInception(_folded(inc.branch1), _folded(inc.branch3)), dtype)
    assert rel_err(_nchw(kinc.inception(_nhwc(x).to(dtype), iw, tf32=tf32)), _ref(inc, x)) < 2e-2

    mods, _ = _head_blocks(32, 64, 64, 1)
    hw = khead.prepare([_folded(m) for m in mods], dtype)
    x = _x(2, 32, 61, 67, seed=8, scale=2.0)
    assert rel_err(khead.head(_nhwc(x).to(dtype), hw, tf32=tf32), _ref(torch.nn.Sequential(*mods), x)) < 2e-2


def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (autotuner + config pruning + heuristics + grid
    lambdas + the head's tuned-config cache), driven here through the
    interpreter with a stand-in benchmark that prefers later configs."""
    timings = iter(range(10**6, 0, -1))

    def fake_bench(fn, quantiles=None, **_):
        fn()
        t = float(next(timings))
        return [t, t, t]

    bench = {} if HAS_CUDA else {"do_bench": fake_bench}
    for mod in (kconv, kinc, khead):
        monkeypatch.setattr(mod, "interpreting", lambda: False)
    monkeypatch.setattr(kconv, "_conv_bn_lrelu_tuned", kconv._tuned(**bench))
    monkeypatch.setattr(kinc, "_inception_tuned", kinc._tuned(**bench))
    monkeypatch.setattr(khead, "_head_tuned", khead._tuned(**bench))
    monkeypatch.setattr(khead, "_TUNED", {})

    block = _block(20, 17, 3, 2)
    x = _x(2, 20, 9, 11)
    y = _nchw(kconv.conv_bn_lrelu(_nhwc(x), kconv.prepare(_folded(block))))
    assert rel_err(y, _ref(block, x)) < TOL
    assert kconv._conv_bn_lrelu_tuned.best_config.kwargs["BLOCK_K"] <= 32  # pruned to the padded C_in

    torch.manual_seed(2)
    inc = randomize_bn(Inception(17, 5, 7), seed=3).eval()
    x = _x(2, 17, 7, 9)
    iw = kinc.prepare(FoldedInception(_folded(inc.branch1), _folded(inc.branch3)))
    assert rel_err(_nchw(kinc.inception(_nhwc(x), iw)), _ref(inc, x)) < TOL

    mods, hw = _head_blocks(5, 9, 17, 2)
    x = _x(2, 5, 13, 21)
    y, sums = khead.head(_nhwc(x), hw, emit_sums=True)
    ref = _ref(torch.nn.Sequential(*mods), x)
    assert rel_err(y, ref) < TOL
    assert len(khead._TUNED) == 1
    bm = next(iter(khead._TUNED.values()))["BLOCK_M"]
    assert sums.shape == (2, -(-(y.shape[2] * y.shape[3]) // bm))
    assert torch.allclose(sums.double().sum(1).cpu(), ref.sum((1, 2, 3)).cpu(), atol=1e-5 * float(ref.abs().sum()))
