"""backend="cpu": folded, fused, FFT inference vs the eager module (random BN, odd sizes)."""
import dataclasses

import pytest
import torch
from conftest import randomize_bn, rel_err

import fastcount.inference as inference
from fastcount.inference import compile as fc_compile
from fastcount.inference.cpu import CPUBackend, bf16_supported, build
from fastcount.model import CountCeption

WIDTH = 0.125  # tiny filter counts, real geometry (14x14 / 18x18 kernels, pad 32)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(CountCeption(width=kw.pop("width", WIDTH), **kw), seed=seed).eval()


def _image(n, h, w, seed=0, c=3):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def _check_equal_counts(y, ref, tol=1e-4):
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < tol
    # count difference relative to the sum of |count map| (the goal's "equal counts")
    diff = (y.double().sum((1, 2, 3)) - ref.double().sum((1, 2, 3))).abs()
    assert float((diff / ref.double().abs().sum((1, 2, 3))).max()) < tol


@pytest.mark.parametrize("n,h,w", [(1, 1, 1), (2, 17, 23), (1, 40, 9), (1, 64, 64)])
def test_fp32_matches_eager(n, h, w):
    model = _model()
    x = _image(n, h, w)
    with torch.inference_mode():
        ref = model(x)
    y = fc_compile(model, backend="cpu", precision="fp32")(x)
    _check_equal_counts(y, ref)


@pytest.mark.parametrize("fft_size", [20, 27, (16, 25), (36, 30), 64])
def test_fft_tile_sizes_all_match(fft_size):
    model = _model(1)
    x = _image(1, 29, 35, seed=1)
    with torch.inference_mode():
        ref = model(x)
    _check_equal_counts(build(model, "fp32", fft_size=fft_size)(x), ref)


@pytest.mark.parametrize("merge", [True, False])
def test_inception_merged_and_split_both_exact(merge):
    model = _model(2, width=0.25)
    x = _image(2, 21, 19, seed=2)
    with torch.inference_mode():
        ref = model(x)
    be = build(model, "fp32", merge=merge)
    assert set(be.choice.merged) == {merge}
    _check_equal_counts(be(x), ref)


@pytest.mark.parametrize("patch_size,stride", [(32, 2), (32, 4), (16, 1), (16, 8)])
def test_geometries_and_output_stride(patch_size, stride):
    model = _model(3, patch_size=patch_size, stride=stride)
    x = _image(1, 25, 30, seed=3)
    with torch.inference_mode():
        ref = model(x)
    _check_equal_counts(build(model, "fp32")(x), ref)


def test_direct_large_convs_match_too():
    model = _model(4)
    x = _image(1, 19, 26, seed=4)
    with torch.inference_mode():
        ref = model(x)
    be = build(model, "fp32", large="direct")
    assert {m for _, m in be.choice.large} == {"direct"}
    _check_equal_counts(be(x), ref)


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
@pytest.mark.parametrize("large,merge", [("auto", "auto"), ("fft", "auto"), ("direct", "auto"), ("auto", False)])
def test_bf16_close_to_eager(large, merge):
    model = _model(5, width=0.25)
    x = _image(2, 33, 27, seed=5)
    with torch.inference_mode():
        ref = model(x)
    y = build(model, "bf16", large=large, merge=merge)(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # bf16 keeps 8 significant bits: per-pixel error ~1e-2 of the map's range, counts far closer
    assert rel_err(y, ref) < 5e-2
    diff = (y.double().sum() - ref.double().sum()).abs() / ref.double().abs().sum()
    assert float(diff) < 1e-2


def test_input_not_mutated_any_layout():
    model = _model(6)
    be = build(model, "fp32")
    for x in (_image(1, 15, 18, seed=6), _image(1, 15, 18, seed=6).contiguous(memory_format=torch.channels_last),
              _image(1, 30, 18, seed=6)[:, :, ::2]):
        before = x.clone()
        be(x)
        assert torch.equal(x, before)
        assert x.stride() == before.stride() or not x.is_contiguous()


def test_float64_and_noncontiguous_inputs():
    model = _model(7)
    x = _image(1, 30, 26, seed=7)[:, :, ::2, 1:]
    with torch.inference_mode():
        ref = model(x.contiguous())
    _check_equal_counts(build(model, "fp32")(x.double()), ref)


def test_errors_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="precision.*fp16"):
        fc_compile(model, backend="cpu", precision="fp16")
    with pytest.raises(ValueError, match="device must be a CPU device"):
        build(model, "fp32", device="cuda")
    with pytest.raises(ValueError, match="device must be a CPU device"):
        fc_compile(model, backend="cpu", device="meta")
    with pytest.raises(TypeError, match="model must be a CountCeption"):
        build(torch.nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="large must be"):
        build(model, large="winograd")
    with pytest.raises(ValueError, match="fft_size must be an int greater than the kernel size"):
        build(model, fft_size=10)
    be = build(model)
    with pytest.raises(ValueError, match=r"x must be an \(N, 3, H, W\)"):
        be(torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        be(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        be([[1.0]])


def test_compile_dispatch_picks_cpu(monkeypatch):
    model = _model()
    assert "cpu" in inference.available_backends("cpu")
    assert isinstance(fc_compile(model, backend="cpu"), CPUBackend)
    # "auto" on a CPU-only machine (triton not runnable) is the cpu backend
    unavailable = dataclasses.replace(inference.REGISTRY["triton"], is_available=lambda device: False)
    monkeypatch.setitem(inference.REGISTRY, "triton", unavailable)
    be = fc_compile(model, backend="auto")
    assert isinstance(be, CPUBackend) and be.precision == "fp32"


def test_weights_are_frozen_at_build():
    model = _model(8)
    x = _image(1, 12, 12, seed=8)
    be = build(model)
    y0 = be(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(be(x), y0)  # the plan is a snapshot, like every compiled backend


def test_fft_sizes_report_and_override():
    model = _model(9)
    auto = build(model)
    sizes = auto.fft_sizes(256, 256)
    assert len(sizes) == 2 and sizes[0] > 14 and sizes[1] > 18
    assert build(model, fft_size=(30, 40)).fft_sizes(256, 256) == [30, 40]
    assert build(model, precision="fp32", large="direct").fft_sizes(256, 256) == []


def test_amx_large_conv_choice_model():
    from fastcount.inference.cpu import _amx_direct_cheaper

    # Fitted to the measured per-layer times: the full-width 14x14 (48 -> 16) is cheaper as a
    # direct AMX conv, the 18x18 (128 -> 32) by FFT; tiny channel counts stay direct.
    assert _amx_direct_cheaper(48, 16, 14)
    assert not _amx_direct_cheaper(128, 32, 18)
    assert _amx_direct_cheaper(4, 2, 18)
    assert not _amx_direct_cheaper(256, 64, 18)


def test_bf16_merge_model_splits_only_the_multiply_bound_block():
    """The AMX roofline (cpu._merge_cost_bf16) splits the full-width 160 -> 64+32 block only
    (measured 12.0-12.8 ms split vs 20.8-21.1 ms merged); memory-bound blocks stay merged."""
    from fastcount.inference.cpu import _merge_cost_bf16

    merged, split = _merge_cost_bf16(160, 64, 32)
    assert split < merged
    for shape in [(64, 16, 16), (32, 16, 32), (16, 112, 48), (96, 40, 40), (80, 32, 96), (80, 32, 16)]:
        merged, split = _merge_cost_bf16(*shape)
        assert merged <= split, shape
