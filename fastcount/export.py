"""ONNX export for embedders: ``export_onnx(model, path)``, ``fastcount export --onnx``.

The exported graph is the folded network (BatchNorm folded into every conv in
float64, stored float32; each Inception block as its two convs and a concat):
input ``image`` (N, C, H, W) float32 of raw 0..255 intensities, output
``count_map`` (N, 1, ceil((H + r) / s), ceil((W + r) / s)), with batch, height
and width dynamic. The geometry an embedder needs to tile exactly is stored as
ONNX ``metadata_props`` (strings; ``onnxruntime`` shows them as
``session.get_modelmeta().custom_metadata_map``): see :data:`METADATA_KEYS`
and the tiling recipe in the README.

Needs the ``onnx`` package (``pip install fastcount[onnx]``); torch's
TorchScript-based exporter does the tracing (no onnxscript needed).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path
from .inference.plan import FoldedConv, FoldedInception, fold
from .model import CountCeption

__all__ = ["export_onnx", "onnx_metadata", "METADATA_KEYS", "OPSET"]

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "count_map"

# What each metadata key means (all values are decimal strings unless noted).
METADATA_KEYS = {
    "patch_size": "r: the side of the window each count-map pixel counts",
    "stride": "s: output stride; count_map row i is full-resolution row i * s",
    "redundancy": "(r/s)^2: count = sum(count_map) / redundancy",
    "halo_before": "input rows/cols a tile needs before its first full-resolution output row/col (r + 6)",
    "halo_after": "input rows/cols a tile needs after its last full-resolution output row/col (6)",
    "window_offset": "full-resolution row Y's window is centred on input row Y - window_offset (r/2)",
    "receptive_field": "side of the input region one output pixel depends on (r + 13)",
    "in_channels": "C of the (N, C, H, W) input",
    "input": "what the input holds",
    "output_size": "count_map height/width for an H x W input",
}


class _FoldedNet(nn.Module):
    """The folded plan as plain conv / LeakyReLU / concat modules (what the exporter traces)."""

    def __init__(self, plan):
        super().__init__()
        self.blocks = nn.ModuleList(
            _Branches(l) if isinstance(l, FoldedInception) else _conv(l) for l in plan.layers)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _Branches(nn.Module):
    def __init__(self, layer: FoldedInception):
        super().__init__()
        self.branch1, self.branch3 = _conv(layer.branch1), _conv(layer.branch3)

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x)], dim=1)


def _conv(layer: FoldedConv) -> nn.Sequential:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, stride=layer.stride,
                     padding=layer.padding, bias=True)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        conv.bias.copy_(layer.bias)
    return nn.Sequential(conv, nn.LeakyReLU(layer.slope))


def onnx_metadata(model: CountCeption) -> dict[str, str]:
    """The ``metadata_props`` ``export_onnx`` writes for ``model`` (string -> string)."""
    g = model.geometry
    return {
        "patch_size": str(g.patch_size),
        "stride": str(g.stride),
        "redundancy": str(g.redundancy),
        "halo_before": str(g.halo_before),
        "halo_after": str(g.halo_after),
        "window_offset": repr(g.window_offset),
        "receptive_field": str(g.receptive_field),
        "in_channels": str(model.in_channels),
        "input": "float32 NCHW, raw 0..255 intensities (no normalisation)",
        "output_size": f"ceil((H + {g.patch_size}) / {g.stride}), ceil((W + {g.patch_size}) / {g.stride})",
    }


def export_onnx(model: CountCeption, path, *, opset: int = OPSET) -> Path:
    """Write ``model`` (BatchNorm folded) to ``path`` as ONNX; returns the path.

    Dynamic batch, height and width; the geometry is in the metadata
    (:func:`onnx_metadata`). The file is written atomically: a failed export
    leaves an existing ``path`` untouched.
    """
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13, got {opset!r}")
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export_onnx needs the onnx package: pip install fastcount[onnx]") from e
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path's folder does not exist: {path.parent}")
    net = _FoldedNet(fold(model, dtype=torch.float64).to("cpu", torch.float32)).eval()
    example = torch.zeros(1, model.in_channels, 64, 64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                        OUTPUT_NAME: {0: "batch", 2: "out_height", 3: "out_width"}})
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in onnx_metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "fastcount"  # (the graph's producer; the geometry is in metadata_props)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path
