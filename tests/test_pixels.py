"""The one pixel rule (fastcount.pixels), through every entry point that reads pixels.

The same 16-bit values must mean the same intensities whether they come as an
array to ``count_image``, an array or a file to ``count_slide``, a file to the
dataset loaders, or a training batch: uint16 x -> x / 257 (float32, unrounded).
"""
import numpy as np
import pytest
import torch

from conftest import randomize_bn
from fastcount import CountCeption, count_image, count_slide
from fastcount.data import load_dataset, read_image
from fastcount.pixels import intensity_dtype, read_image_file, tensor_to_intensities, to_intensities
from fastcount.slide import ArrayReader, ImageReader, TiffReader, open_reader
from fastcount.train import TrainConfig, _batch, predict_counts

pytestmark = pytest.mark.usefixtures("one_thread")

VALUES16 = np.array([0, 200, 12345, 65535], dtype=np.uint16)
# What the README promises for them: x / 257, kept as float32 (200 -> 0.778, 65535 -> 255).
EXPECT16 = VALUES16.astype(np.float32) / np.float32(257)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(CountCeption(width=0.0625), seed=0).eval()


def gray16(h=37, w=41, seed=0):
    """A 16-bit grayscale image holding VALUES16 in its first row and random values elsewhere."""
    a = np.random.default_rng(seed).integers(0, 65536, (h, w), dtype=np.uint16)
    a[0, :4] = VALUES16
    return a


def rgb16(h=37, w=41, seed=1):
    a = np.random.default_rng(seed).integers(0, 65536, (h, w, 3), dtype=np.uint16)
    a[0, :4] = VALUES16[:, None]
    return a


def expected(a16):
    return to_intensities(a16)


# --------------------------------------------------------------------------- the rule itself


def test_rule_on_each_dtype():
    out = to_intensities(VALUES16[None])
    assert out.dtype == np.float32 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], EXPECT16)
    assert out[0, 1, 0] == pytest.approx(200 / 257) and out[0, 3, 0] == 255.0
    u8 = np.array([[0, 7, 255]], np.uint8)
    assert to_intensities(u8).dtype == np.uint8 and to_intensities(u8)[0, :, 1].tolist() == [0, 7, 255]
    for dt in (np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64):
        got = to_intensities(np.array([[0, 3, 127]], dtype=dt))
        assert got.dtype == np.uint8 and got[0, :, 2].tolist() == [0, 3, 127], dt
    for dt in (np.int32, np.uint32, np.int64):
        with pytest.raises(ValueError, match=r"integer values in \[0, 300\], outside 0\.\.255"):
            to_intensities(np.array([[0, 300]], dtype=dt), "image")
    with pytest.raises(ValueError, match="outside 0..255"):
        to_intensities(np.array([[-1, 3]], dtype=np.int16))
    f = np.array([[0.0, 0.5, 254.9, 255.0]], np.float64)
    assert to_intensities(f).dtype == np.float32
    np.testing.assert_array_equal(to_intensities(f)[0, :, 0], f[0].astype(np.float32))
    with pytest.raises(ValueError, match=r"float values in \[0, 256\]"):
        to_intensities(np.array([[0.0, 256.0]], np.float32))
    with pytest.raises(ValueError, match="outside 0..255"):
        to_intensities(np.array([[-0.5, 3.0]], np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_intensities(np.array([[np.inf]], np.float32))
    with pytest.raises(TypeError, match="dtype bool"):
        to_intensities(np.zeros((2, 2), bool))
    with pytest.raises(TypeError, match="dtype complex"):
        to_intensities(np.zeros((2, 2), np.complex64))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        to_intensities(np.zeros((2, 2, 2), np.uint8))
    g = np.random.default_rng(0).integers(0, 256, (5, 6), dtype=np.uint8)
    assert (to_intensities(g) == g[:, :, None]).all() and to_intensities(g).shape == (5, 6, 3)
    rgba = np.random.default_rng(1).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    assert (to_intensities(rgba) == rgba[:, :, :3]).all()
    assert [intensity_dtype(d) for d in (np.uint8, np.int32, np.uint16, np.float64)] == [
        np.uint8, np.uint8, np.float32, np.float32]


def test_tensor_rule_matches_array_rule():
    a = rgb16()
    t = torch.from_numpy(a.astype(np.int64)).to(torch.uint16)
    np.testing.assert_array_equal(tensor_to_intensities(t).numpy(), expected(a))
    assert tensor_to_intensities(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 255.0]
    with pytest.raises(ValueError, match="outside 0..255"):
        tensor_to_intensities(torch.tensor([0, 300], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside 0..255"):
        tensor_to_intensities(torch.tensor([0.0, 1000.0]))
    with pytest.raises(TypeError, match="bool"):
        tensor_to_intensities(torch.zeros(2, dtype=torch.bool))


# --------------------------------------------------------------------------- every entry point


def _write_png16(path, a):
    from PIL import Image

    Image.fromarray(a).save(path)  # mode I;16
    return path


def _write_png16_rgb(path, a):
    imagecodecs = pytest.importorskip("imagecodecs", reason="writing a 16-bit RGB PNG needs imagecodecs")
    path.write_bytes(imagecodecs.png_encode(a))
    return path


def test_16bit_grayscale_png_every_reader(tmp_path):
    a = gray16()
    p = _write_png16(tmp_path / "g16.png", a)
    want = expected(a)
    assert want[0, 1, 0] == pytest.approx(0.778, abs=1e-3)
    for got in (read_image(p), read_image_file(p), ImageReader(p).read_region(0, 0, 0, *a.shape),
                open_reader(p).read_region(0, 0, 0, *a.shape), ArrayReader(a).read_region(0, 0, 0, *a.shape)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    assert ImageReader(p).dtype == np.float32 and ArrayReader(a).dtype == np.float32


def test_16bit_rgb_png_and_tiff_every_reader(tmp_path):
    import tifffile

    a = rgb16()
    want = expected(a)
    png = _write_png16_rgb(tmp_path / "c16.png", a)
    tif = tmp_path / "c16.tif"
    tifffile.imwrite(tif, a, photometric="rgb", tile=(16, 16))
    readers = [read_image(png), read_image(tif), open_reader(png).read_region(0, 0, 0, 37, 41),
               TiffReader(tif).read_region(0, 0, 0, 37, 41), open_reader(tif).read_region(0, 0, 0, 37, 41)]
    for got in readers:
        np.testing.assert_array_equal(got, want)


def test_count_image_equals_count_slide_on_uint16(model, tmp_path):
    a = rgb16(70, 53, seed=3)
    x = torch.from_numpy(expected(a)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        cm = model(x)
    ref = float(cm.double().sum()) / 1024
    scale = float(cm.double().abs().sum()) / 1024
    n = count_image(a, model)
    assert n == pytest.approx(ref, rel=1e-9)
    assert n == count_image(expected(a), model)  # same pixels, same arithmetic
    t16 = torch.from_numpy(a.astype(np.int64)).to(torch.uint16).permute(2, 0, 1)
    assert count_image(t16, model) == n
    for backend in ("eager", "cpu"):
        res = count_slide(a, model, tile=32, mask=None, progress=False, backend=backend)
        assert abs(res.total - n) <= 1e-5 * scale, (backend, res.total, n)
    # A 16-bit file counts exactly like the array it holds.
    import tifffile

    tif = tmp_path / "a16.tif"
    tifffile.imwrite(tif, a, photometric="rgb", tile=(16, 16))
    arr = count_slide(a, model, tile=32, mask=None, progress=False, backend="eager").total
    assert count_slide(tif, model, tile=32, mask=None, progress=False, backend="eager").total == arr
    png = _write_png16(tmp_path / "g16.png", a[:, :, 0])
    g = np.repeat(a[:, :, :1], 3, axis=2)
    assert count_slide(png, model, tile=32, mask=None, progress=False, backend="eager").total == \
        count_slide(g, model, tile=32, mask=None, progress=False, backend="eager").total


def test_dataset_loader_and_training_use_the_rule(model, tmp_path):
    a = gray16(48, 40, seed=5)
    _write_png16(tmp_path / "x.png", a)
    (tmp_path / "x.csv").write_text("row,col\n3,4\n20,30\n")
    ds = load_dataset("folder", tmp_path)
    img, dots = ds[0]
    np.testing.assert_array_equal(img, expected(a))
    assert int(dots.sum()) == 2
    # predict_counts (evaluation and validation) sees what count_image sees.
    assert predict_counts(model, [img])[0] == pytest.approx(count_image(a, model), rel=1e-9)
    assert predict_counts(model, [a])[0] == pytest.approx(count_image(a, model), rel=1e-9)
    # A training batch holds the same intensities (no crop, no augmentation: the image itself).
    x, _ = _batch(ds, [0], TrainConfig(crop=None, augment=False), torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), expected(a))
    # Halving (the MBM protocol) keeps 16-bit precision instead of rounding to 8 bits.
    ds2 = load_dataset("folder", tmp_path, halve=True)
    want = expected(a).reshape(24, 2, 20, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(ds2[0][0], want, rtol=1e-6)


def test_out_of_range_inputs_refused_the_same_everywhere(model, tmp_path):
    big = np.full((40, 40, 3), 300, np.int32)
    neg = np.full((40, 40, 3), -1.0, np.float32)
    for bad, match in ((big, "outside 0..255"), (neg, "outside 0..255")):
        with pytest.raises(ValueError, match=match):
            count_image(bad, model)
        with pytest.raises(ValueError, match=match):
            count_slide(bad, model, mask=None, progress=False, backend="eager")
        with pytest.raises(ValueError, match=match):
            predict_counts(model, [bad])
    for bad in (np.zeros((40, 40), bool), np.zeros((40, 40, 3), np.complex64)):
        for f in (lambda: count_image(bad, model),
                  lambda: count_slide(bad, model, mask=None, progress=False, backend="eager")):
            with pytest.raises(TypeError, match="dtype"):
                f()
    # A 32-bit integer PNG/TIFF file goes through the same check.
    from PIL import Image

    p = tmp_path / "i32.tif"
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(p)
    with pytest.raises(ValueError, match="outside 0..255"):
        read_image(p)
    Image.fromarray(np.full((8, 8), 200, np.int32)).save(p)
    assert read_image(p).dtype == np.uint8 and (read_image(p) == 200).all()


def _png_claiming(path, w, h):
    """A valid 1x1 PNG whose header is rewritten (with a correct CRC) to claim w x h pixels."""
    import struct
    import zlib

    from PIL import Image

    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    b = bytearray(path.read_bytes())
    i = b.index(b"IHDR")
    b[i + 4 : i + 12] = struct.pack(">II", w, h)
    b[i + 17 : i + 21] = struct.pack(">I", zlib.crc32(bytes(b[i : i + 17])))
    path.write_bytes(bytes(b))
    return path


def test_decompression_bomb_png_refused_before_decoding(tmp_path):
    """A 70-byte PNG claiming 40000^2 pixels would make PIL allocate 4.8 GB: refused by its header."""
    p = _png_claiming(tmp_path / "bomb.png", 40000, 40000)
    assert p.stat().st_size < 100
    with pytest.raises(ValueError, match="claims 40000x40000 pixels"):
        read_image(p)
    from fastcount.slide import SlideReadError

    with pytest.raises(SlideReadError, match="claims 40000x40000"):
        open_reader(p)
    # A legitimately well-compressed flat PNG still reads.
    from PIL import Image

    Image.fromarray(np.zeros((600, 700, 3), np.uint8)).save(tmp_path / "flat.png")
    assert read_image(tmp_path / "flat.png").shape == (600, 700, 3)
