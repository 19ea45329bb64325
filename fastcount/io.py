"""Weights in safetensors, with the model config in the file's metadata. No pickle."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .files import atomic_path
from .inference.rounding import METADATA_KEY as ROUNDING_METADATA_KEY
from .inference.rounding import Bf16Rounding, current_rounding
from .model import CountCeption

__all__ = ["save_model", "load_model", "default_weights_path", "read_metadata", "MODELS", "packaged_weights_path",
           "packaged_models"]

FORMAT = "fastcount.countception"
DEFAULT_WEIGHTS = "default.safetensors"
# The packaged models by name: file in fastcount/weights/, training data, intended images.
# "vgg" is the default (``load_model()``); its file keeps the name default.safetensors.
MODELS = {
    "vgg": {"file": DEFAULT_WEIGHTS, "data": "VGG cells (synthetic fluorescence), N=32",
            "stain": "fluorescence: bright cells on a dark background"},
    "mbm": {"file": "mbm.safetensors", "data": "MBM bone marrow (H&E), N=15, fine-tuned from vgg, images halved to 300x300",
            "stain": "brightfield H&E bone-marrow nuclei, at the scale of the halved MBM images"},
}


def default_weights_path() -> Path:
    """Where the packaged default weights live (they may not exist yet)."""
    return Path(str(resources.files("fastcount").joinpath("weights", DEFAULT_WEIGHTS)))


def packaged_weights_path(name: str) -> Path:
    """Where the packaged model ``name`` ("vgg", "mbm") lives (it may not be installed)."""
    if name not in MODELS:
        raise ValueError(f"unknown packaged model {name!r}; packaged models: {sorted(MODELS)}")
    return Path(str(resources.files("fastcount").joinpath("weights", MODELS[name]["file"])))


def packaged_models() -> list[dict]:
    """The packaged models: name, path, installed, training data, stain and test MAE (from the metadata)."""
    out = []
    for name, info in MODELS.items():
        path = default_weights_path() if name == "vgg" else packaged_weights_path(name)
        row = {"name": name, "path": str(path), "installed": path.is_file(), "data": info["data"],
               "stain": info["stain"], "test_mae": None, "test_images": None}
        if path.is_file():
            meta = read_metadata(path)
            row["test_mae"] = float(meta["test_mae"]) if "test_mae" in meta else None
            row["test_images"] = meta.get("test_images")
        out.append(row)
    return out


def save_model(model: CountCeption, path, metadata: dict | None = None) -> Path:
    """Write ``model`` (weights, BN statistics, config) to a safetensors file.

    ``metadata`` adds string-valued notes (e.g. the test MAE) to the header.
    The file is written to a temporary name and renamed, so an interrupted
    save never leaves a truncated file where a good one was.
    """
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a fastcount.CountCeption, got {type(model).__name__}")
    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(model.config)}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    rounding = current_rounding(model)  # calibrated bf16 values, optional
    if rounding is not None:
        extra_tensors, extra_meta = rounding.to_state()
        tensors.update(extra_tensors)
        meta.update(extra_meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path) -> dict:
    """The header metadata of a fastcount weights file (config decoded)."""

    path = _check_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors weights file: {e}") from e
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} is a safetensors file but not fastcount Count-ception weights (no config metadata)")
    meta["config"] = json.loads(meta["config"])
    return meta


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def load_model(path=None, device="cpu") -> CountCeption:
    """Load a CountCeption from safetensors, in eval mode.

    ``path``: a weights file, a packaged model name (``"vgg"``, ``"mbm"``; see ``MODELS``),
    or None for the default (``"vgg"``).
    """
    if isinstance(path, str) and path in MODELS:
        if path != "vgg":
            named = packaged_weights_path(path)
            if not named.is_file():
                raise FileNotFoundError(f"the packaged model {path!r} is not installed (expected {named})")
            path = named
        else:
            path = None
    if path is None:
        path = default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                "fastcount has no packaged default weights in this installation "
                f"(expected {path}); train some with `fastcount train ... --out W.safetensors` "
                "and pass model=/path=W.safetensors"
            )
    meta = read_metadata(path)
    cfg = meta["config"]
    model = CountCeption(
        in_channels=int(cfg["in_channels"]),
        patch_size=int(cfg["patch_size"]),
        stride=int(cfg["stride"]),
        width=float(cfg["width"]),
    )
    state = load_file(str(path))
    rounding = Bf16Rounding.from_state(state, meta)  # takes its tensors out of `state`
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.metadata = {k: v for k, v in meta.items() if k not in ("format", "config", ROUNDING_METADATA_KEY)}
    if rounding is not None:
        model.bf16_rounding = rounding
    return model.to(device).eval()
