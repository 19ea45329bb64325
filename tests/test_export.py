"""ONNX export: ONNX Runtime's count map equals eager's, the metadata round-trips, and the
README's tiling recipe (ONNX Runtime alone) reproduces the whole-image count."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcount
from fastcount import CountCeption, export_onnx, redundant_count
from fastcount.cli import main
from fastcount.export import METADATA_KEYS, onnx_metadata
from fastcount.testing import randomize_bn

from conftest import rel_err

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install fastcount[onnx])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install fastcount[dev])")

README = Path(__file__).resolve().parents[1] / "README.md"
# ORT's and torch's fp32 convs sum in different orders: measured max |map diff| / max |map| is
# 1e-7 (width 0.0625) to 3e-7 (width 0.5) on random-BN models, count diff / sum|map| 5e-9..3e-8.
MAP_TOL = 1e-5
COUNT_TOL = 1e-6


def _model(patch_size=32, stride=1, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(CountCeption(patch_size=patch_size, stride=stride, width=0.0625), seed=seed).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path, session) for a stride-2 tiny model with random BN statistics."""
    model = _model(stride=2, seed=1)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "m.onnx")
    return model, path, ort.InferenceSession(str(path))


def _count(model, cmap):
    return redundant_count(cmap, model.geometry.patch_size, model.geometry.stride)


def _eager(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (3, 3, 61, 29)])
def test_onnxruntime_map_equals_eager(exported, shape):
    model, _, sess = exported
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 255
    ref = _eager(model, x)
    got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    assert got.shape == ref.shape == (shape[0], 1, *model.geometry.output_size(*shape[2:]))
    assert rel_err(got, ref) < MAP_TOL
    scale = ref.double().abs().sum((1, 2, 3)) / model.geometry.redundancy
    diff = (_count(model, got) - _count(model, ref)).abs()
    assert bool((diff <= COUNT_TOL * scale).all()), (diff, scale)


def test_batch_equals_single_images(exported):
    _, _, sess = exported
    x = (torch.rand(3, 3, 45, 39, generator=torch.Generator().manual_seed(5)) * 255).numpy()
    whole = sess.run(None, {"image": x})[0]
    for i in range(3):
        one = sess.run(None, {"image": x[i : i + 1]})[0]
        np.testing.assert_allclose(whole[i : i + 1], one, rtol=0, atol=1e-5 * np.abs(one).max())


def test_metadata_round_trips(tmp_path):
    model = _model(patch_size=16, stride=4, seed=2)
    path = export_onnx(model, tmp_path / "g.onnx")
    want = onnx_metadata(model)
    g = model.geometry
    assert set(want) == set(METADATA_KEYS)
    assert want["patch_size"] == "16" and want["stride"] == "4" and want["redundancy"] == str(g.redundancy) == "16"
    assert (want["halo_before"], want["halo_after"]) == (str(g.halo_before), str(g.halo_after)) == ("22", "6")
    assert float(want["window_offset"]) == g.window_offset == 8.0
    assert proto_producer(path) == "fastcount"
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props} == want
    assert ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map == want
    names = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert names == ["batch", "", "height", "width"]  # dynamic batch/height/width, fixed channels
    # BatchNorm is folded: the graph holds convs, LeakyReLUs and concats only
    assert {n.op_type for n in proto.graph.node} <= {"Conv", "LeakyRelu", "Concat"}


def proto_producer(path):
    return onnx.load(str(path)).producer_name


def _readme_recipe():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    recipe = [b for b in blocks if "def count_tiled" in b]
    assert len(recipe) == 1, "the README's ONNX tiling recipe (def count_tiled) is missing"
    ns = {}
    exec(recipe[0], ns)
    return ns["count_tiled"]


@pytest.mark.parametrize("tile", [32, 48])
def test_readme_tiling_recipe_reproduces_whole_image_count(exported, tile):
    model, path, sess = exported
    count_tiled = _readme_recipe()
    image = np.random.default_rng(tile).integers(0, 256, (101, 77, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    ref = _eager(model, x)
    whole = float(_count(model, ref).sum())
    scale = float(ref.double().abs().sum()) / model.geometry.redundancy
    ort_whole = float(sess.run(None, {"image": x.numpy()})[0].sum(dtype=np.float64)) / model.geometry.redundancy
    tiled = count_tiled(str(path), image, tile=tile)
    assert abs(tiled - ort_whole) <= 1e-6 * scale  # exact tiling: same runtime, only float rounding
    assert abs(tiled - whole) <= COUNT_TOL * scale


def test_cli_export_with_weights(tmp_path, capsys):
    model = _model(seed=3)
    weights = tmp_path / "w.safetensors"
    fastcount.save_model(model, weights)
    out = tmp_path / "cli.onnx"
    assert main(["export", "--onnx", str(out), "--weights", str(weights)]) == 0
    assert "halo 38/6" in capsys.readouterr().out
    x = torch.rand(1, 3, 33, 35, generator=torch.Generator().manual_seed(0)) * 255
    got = torch.from_numpy(ort.InferenceSession(str(out)).run(None, {"image": x.numpy()})[0])
    assert rel_err(got, _eager(fastcount.load_model(weights), x)) < MAP_TOL


def test_bad_arguments_leave_existing_file(tmp_path):
    path = tmp_path / "keep.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(TypeError, match="model must be a CountCeption"):
        export_onnx(torch.nn.Conv2d(3, 1, 1), path)
    with pytest.raises(ValueError, match="opset must be"):
        export_onnx(_model(), path, opset=7)
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        export_onnx(_model(), tmp_path / "missing" / "m.onnx")
    assert path.read_bytes() == b"previous"
    assert main(["export", "--onnx", str(tmp_path / "missing" / "m.onnx"), "--weights", str(tmp_path / "no.st")]) == 2
    assert list(tmp_path.iterdir()) == [path]
