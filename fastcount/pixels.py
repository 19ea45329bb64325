"""The one pixel rule: how every entry point turns image data into 0..255 intensities.

The network was trained on raw 8-bit intensities, so everything it sees is
put on that scale, by this module only (``count_image``, every slide reader,
the dataset loaders and training all call it):

- uint8: used as is;
- uint16: ``x / 257`` as float32 (0 -> 0, 257 -> 1, 65535 -> 255; not rounded,
  so no 16-bit detail is lost);
- other integer dtypes (int8..int64, uint32, uint64): used as is when every
  value lies in 0..255, refused otherwise (rescale them yourself: we cannot
  know their range);
- float dtypes: 0..255 intensities used unchanged (as float32); NaN,
  infinities or values outside 0..255 are refused (a 0..1 image must be
  multiplied by 255 first);
- bool and complex: refused;
- channels: grayscale (HxW or HxWx1) is repeated to 3, 4+ channels keep the
  first three (alpha dropped), 2 channels are refused.

Every conversion returns uint8 when the source holds 8-bit values and float32
otherwise (``intensity_dtype`` says which, from the dtype alone).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["UINT16_SCALE", "intensity_dtype", "to_intensities", "tensor_to_intensities", "read_image_file", "image_to_tensor"]

UINT16_SCALE = 257.0  # 65535 / 255: maps the full 16-bit range onto 0..255


def _check_dtype(dtype: np.dtype, name: str):
    if dtype == np.bool_ or dtype.kind not in "uif":
        raise TypeError(f"{name} must hold uint8, uint16, integer (0..255) or float (0..255) intensities, "
                        f"got dtype {dtype}")


def intensity_dtype(dtype, name: str = "image") -> type:
    """The dtype ``to_intensities`` returns for a source of ``dtype``: uint8 or float32."""
    dtype = np.dtype(dtype)
    _check_dtype(dtype, name)
    return np.float32 if dtype == np.uint16 or dtype.kind == "f" else np.uint8


def _check_range(lo: float, hi: float, dtype, name: str):
    if not (0 <= lo and hi <= 255):
        what = "float" if np.dtype(dtype).kind == "f" else "integer"
        raise ValueError(f"{name} has {what} values in [{lo:g}, {hi:g}], outside 0..255 (dtype {dtype}); "
                         f"pass uint8, uint16, or {what}s scaled to 0..255")


def _three_channels(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be HxW or HxWxC, got shape {a.shape}")
    c = a.shape[2]
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c >= 3:
        return a[:, :, :3]
    raise ValueError(f"{name} must have 1, 3 or 4 channels, got {c} (shape {a.shape})")


def to_intensities(a, name: str = "image") -> np.ndarray:
    """An ``HxW`` / ``HxWxC`` array as a contiguous ``(H, W, 3)`` array of 0..255 intensities
    (uint8, or float32 for uint16 and float sources); see the module doc for the rule."""
    a = np.asarray(a)
    _check_dtype(a.dtype, name)
    a = _three_channels(a, name)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return a.astype(np.float32) / np.float32(UINT16_SCALE)
    if a.size:
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        _check_range(float(a.min()), float(a.max()), a.dtype, name)
    return np.ascontiguousarray(a, dtype=intensity_dtype(a.dtype))


_TORCH_UINT16 = getattr(torch, "uint16", None)


def tensor_to_intensities(t: torch.Tensor, name: str = "image") -> torch.Tensor:
    """A tensor of pixels as float32 0..255 intensities, by the same dtype rule as ``to_intensities``
    (shape untouched: channel handling is the caller's, as tensors are CHW)."""
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold uint8, uint16, integer (0..255) or float (0..255) intensities, "
                        f"got dtype {t.dtype}")
    if t.dtype == torch.uint8:
        return t.to(torch.float32)
    if _TORCH_UINT16 is not None and t.dtype == _TORCH_UINT16:
        return t.to(torch.float32) / UINT16_SCALE
    if t.numel():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        lo, hi = torch.aminmax(t)
        _check_range(float(lo), float(hi), "float" if t.is_floating_point() else "int", name)
    return t.to(torch.float32)


def _pil_sixteen_bit_rgb(im) -> bool:
    """True when PIL would decode this file's 16-bit colour samples to 8 bits (it keeps the high byte)."""
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(raw, str) and ";16" in raw and im.mode in ("RGB", "RGBA", "RGBX"):
            return True
    return False


def _read_sixteen_bit_rgb(path: Path) -> np.ndarray:
    try:
        import imagecodecs
    except ImportError as e:
        raise ValueError(f"{path} holds 16-bit colour, which PIL can only read as 8-bit; "
                         f"install imagecodecs (pip install 'fastcount[slides]') to read it exactly") from e
    return np.asarray(imagecodecs.imread(str(path)))


def read_image_file(path, name: str | None = None) -> np.ndarray:
    """Decode an image file (PNG, JPEG, TIFF, BMP, ...) keeping its bit depth, then apply the pixel rule.

    Returns ``(H, W, 3)`` uint8 for 8-bit files and float32 0..255 for 16-bit
    and float files. Raises ``ValueError`` naming the file when it cannot be
    decoded, ``FileNotFoundError`` when it does not exist.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    Image.MAX_IMAGE_PIXELS = None  # our own inputs: a slide-sized PNG is legitimate
    try:
        with Image.open(path) as im:
            _check_decodable_size(im, path)
            if _pil_sixteen_bit_rgb(im):
                a = _read_sixteen_bit_rgb(path)
            else:
                im.load()
                a = _pil_array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError,
            IndexError, KeyError, MemoryError, ZeroDivisionError, RuntimeError, AttributeError) as e:
        # PIL's decoders raise many types on damaged files; all mean "not a readable image".
        if isinstance(e, ValueError) and "imagecodecs" in str(e):
            raise
        raise ValueError(f"cannot read {path} as an image: {type(e).__name__}: {e}") from e
    if a.ndim < 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image {path} is empty")
    return to_intensities(a, name)


# deflate cannot compress better than about 1032:1, so a PNG claiming more pixel bytes than this
# many times its file size is damaged or a decompression bomb.
_PNG_MAX_RATIO = 1100


def _check_decodable_size(im, path: Path):
    """Refuse, before decoding, an image whose header claims more pixels than is sane to decode whole."""
    w, h = im.size
    decoded = w * h * 3 * 4  # float32 RGB: the largest result of the pixel rule
    least_bytes = w * h // 8 if im.mode == "1" else w * h  # a lower bound on the inflated size
    if im.format == "PNG" and least_bytes > _PNG_MAX_RATIO * max(path.stat().st_size, 1):
        raise ValueError(f"{path} claims {w}x{h} pixels, more than its {path.stat().st_size} bytes can hold "
                         f"(damaged file?)")
    ram = _physical_memory()
    if ram and decoded > ram // 2:
        raise ValueError(f"{path} is {w}x{h} pixels: decoding it whole would need {decoded / 2**30:.1f} GiB "
                         f"of this machine's {ram / 2**30:.0f} GiB; save it as a tiled TIFF, which is read "
                         f"tile by tile")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _pil_array(im) -> np.ndarray:
    """A decoded PIL image as a numpy array of its own sample type."""
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)  # byte order normalised
    if im.mode == "I":
        a = np.asarray(im)
        # Pillow before 10.2 opened 16-bit grayscale PNGs as 32-bit "I".
        return a.astype(np.uint16) if im.format == "PNG" else a
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32)
    if im.mode in ("L", "RGB", "RGBA"):
        return np.asarray(im)
    if im.mode == "LA":
        return np.asarray(im)[:, :, 0]
    return np.asarray(im.convert("RGB"))


def image_to_tensor(image, in_channels: int = 3) -> torch.Tensor:
    """Image -> NCHW float32 tensor of 0..255 intensities.

    Accepts an ``HxWxC`` or ``HxW`` numpy array or a ``CHW``/``NCHW`` tensor;
    dtypes and channels follow the one pixel rule of this module
    (uint8 as is, uint16 / 257, other integers and floats must lie in 0..255;
    grayscale repeated to 3 channels, RGBA drops alpha).
    """
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3) and 0 in image.shape[:2]:
            raise ValueError(f"image is empty: shape {image.shape}")
        if in_channels == 3:  # the common case: the rule's own channel handling
            return _float_nchw(to_intensities(image, "image"))
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"image must be HxW or HxWxC, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a numpy array or torch tensor, got {type(image).__name__}")
    t = image[None] if image.dim() == 3 else image
    if t.dim() != 4:
        raise ValueError(f"image tensor must be CHW or NCHW, got shape {tuple(image.shape)}")
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise ValueError(f"image is empty: shape {tuple(t.shape)}")
    t = tensor_to_intensities(t, "image")
    c = t.shape[1]
    if c != in_channels:
        if in_channels == 3 and c == 1:
            t = t.expand(-1, 3, -1, -1)
        elif in_channels == 3 and c == 4:
            t = t[:, :3]
        else:
            raise ValueError(f"image has {c} channels, the model expects {in_channels}")
    return t


def _float_nchw(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only arrays (e.g. from PIL) are fine: the float cast copies
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a).permute(2, 0, 1)[None].to(torch.float32, copy=True)  # never alias the caller's array
