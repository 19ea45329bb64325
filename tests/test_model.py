import math

import pytest
import torch

import fastcount
from fastcount import CountCeption
from fastcount.geometry import Geometry, large_kernels

from conftest import randomize_bn, rel_err


def test_parameter_count_full_width():
    m = CountCeption()
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == 1_682_995
    conv_w = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    assert conv_w == 1_680_640
    bn_channels = sum(mod.num_features for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert bn_channels == 785


def test_layer_table():
    m = CountCeption()
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    kernels = [c.kernel_size[0] for c in convs]
    outs = [c.out_channels for c in convs]
    # first conv, 2 Inception, 14x14, 4 Inception, 18x18, three 1x1
    assert kernels == [3, 1, 3, 1, 3, 14, 1, 3, 1, 3, 1, 3, 1, 3, 18, 1, 1, 1]
    assert outs == [64, 16, 16, 16, 32, 16, 112, 48, 64, 32, 40, 40, 32, 96, 32, 64, 64, 1]
    assert convs[0].padding == (32, 32)
    assert all(isinstance(mod, torch.nn.LeakyReLU) and mod.negative_slope == 0.01
               for mod in m.modules() if isinstance(mod, torch.nn.LeakyReLU))
    assert sum(isinstance(mod, torch.nn.LeakyReLU) for mod in m.modules()) == 18


def test_xavier_init_bounds():
    m = CountCeption(width=0.25)
    gain = torch.nn.init.calculate_gain("leaky_relu", 0.01)
    for c in (mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)):
        fan_in = c.in_channels * c.kernel_size[0] ** 2
        fan_out = c.out_channels * c.kernel_size[0] ** 2
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        assert c.weight.abs().max() <= bound + 1e-7
        assert c.weight.abs().max() > 0.5 * bound


@pytest.mark.parametrize("h,w", [(256, 256), (1, 1), (17, 5), (40, 33)])
def test_output_shape_stride1(h, w):
    m = CountCeption(width=0.0625).eval()
    with torch.no_grad():
        y = m(torch.rand(2, 3, h, w) * 255)
    assert y.shape == (2, 1, h + 32, w + 32)


def test_output_shape_256_full_width():
    m = CountCeption().eval()
    with torch.no_grad():
        y = m(torch.rand(1, 3, 256, 256) * 255)
    assert y.shape == (1, 1, 288, 288)


@pytest.mark.parametrize("stride", [1, 2, 4, 8, 16, 32])
def test_output_shape_strides(stride):
    m = CountCeption(stride=stride, width=0.0625).eval()
    with torch.no_grad():
        y = m(torch.rand(1, 3, 37, 50) * 255)
    assert y.shape[-2:] == Geometry(32, stride).output_size(37, 50)
    assert y.shape[-2:] == (math.ceil(69 / stride), math.ceil(82 / stride))


@pytest.mark.parametrize("patch", [8, 16, 20, 64])
def test_other_patch_sizes(patch):
    m = CountCeption(patch_size=patch, width=0.0625).eval()
    k1, k2 = large_kernels(patch)
    assert 2 + (k1 - 1) + (k2 - 1) == patch
    with torch.no_grad():
        y = m(torch.rand(1, 3, 23, 9) * 255)
    assert y.shape[-2:] == (23 + patch, 9 + patch)


@pytest.mark.parametrize("width,expect", [(0.5, [32, 8, 8]), (0.001, [1, 1, 1])])
def test_width_scales_filters(width, expect):
    m = CountCeption(width=width)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs[:3]] == expect
    assert convs[-1].out_channels == 1


def test_receptive_field_matches_geometry():
    """Output pixel Y depends on input rows Y-38 .. Y+6 exactly."""
    m = randomize_bn(CountCeption(width=0.0625).double()).eval()
    g = m.geometry
    h = 120
    x = torch.rand(1, 3, h, 8, dtype=torch.float64, requires_grad=True) * 255
    x.retain_grad()
    y = m(x)
    Y = 70
    y[0, 0, Y, :].sum().backward()
    rows = (x.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
    assert int(rows.min()) == Y - g.halo_before
    assert int(rows.max()) == Y + g.halo_after
    assert g.receptive_field == 45


def test_bad_model_args():
    with pytest.raises(ValueError, match="stride"):
        CountCeption(stride=3)
    with pytest.raises(ValueError, match="patch_size"):
        CountCeption(patch_size=2)
    with pytest.raises(ValueError, match="width"):
        CountCeption(width=0)
    with pytest.raises(ValueError, match="in_channels"):
        CountCeption(in_channels=0)
    m = CountCeption(width=0.0625)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.rand(3, 10, 10))


def test_fold_matches_module():
    from fastcount.inference import fold

    m = randomize_bn(CountCeption(width=0.125), seed=3).eval()
    x = torch.rand(2, 3, 29, 41) * 255
    with torch.no_grad():
        ref = m.double()(x.double())
        got = fold(m, torch.float64).reference(x.double())
    assert rel_err(got, ref) < 1e-10


def test_eager_backend_is_the_module():
    m = randomize_bn(CountCeption(width=0.125)).eval()
    f = fastcount.inference.compile(m, backend="eager")
    x = torch.rand(1, 3, 20, 20) * 255
    with torch.no_grad():
        assert torch.equal(f(x), m(x))
    with pytest.raises(ValueError, match="backend"):
        fastcount.inference.compile(m, backend="magic")
    with pytest.raises(ValueError, match="precision"):
        fastcount.inference.compile(m, precision="int4")
