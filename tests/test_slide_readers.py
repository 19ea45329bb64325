"""Readers: real fixture slides through OpenSlide and tifffile, arrays, conversions, errors."""
import numpy as np
import pytest
import torch

from conftest import SLIDES, whole_count as whole
from fastcount import count_slide
from fastcount.slide import ArrayReader, OpenSlideReader, SlideReadError, TiffReader, open_reader



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def test_boxes_tiff_both_readers_agree_with_png():
    png = open_reader(SLIDES / "boxes.png").read_region(0, 0, 0, 250, 300)
    t = TiffReader(SLIDES / "boxes.tiff")
    o = OpenSlideReader(SLIDES / "boxes.tiff")
    assert t.level_shapes == o.level_shapes == [(250, 300), (125, 150), (62, 75), (31, 37)]
    np.testing.assert_array_equal(t.read_region(0, 0, 0, 250, 300), png)
    np.testing.assert_array_equal(o.read_region(0, 0, 0, 250, 300), png)
    # Regions anywhere, at any level, agree between the two libraries.
    for lv, (y, x, h, w) in [(0, (17, 33, 50, 61)), (1, (3, 100, 90, 50)), (3, (0, 0, 31, 37))]:
        np.testing.assert_array_equal(t.read_region(lv, y, x, h, w), o.read_region(lv, y, x, h, w))
    assert o.mpp == pytest.approx(352.7777, rel=1e-4)
    t.close(), o.close()


def test_level_and_mpp_selection(model):
    res = count_slide(SLIDES / "boxes.tiff", model, level=2, tile=32, mask=None, progress=False, backend="eager")
    assert res.level == 2 and res.shape == (62, 75) and res.downsample == pytest.approx(4.0, rel=0.01)
    res = count_slide(SLIDES / "boxes.tiff", model, mpp=352.8 * 2, tile=32, mask=None, progress=False, backend="eager")
    assert res.level == 1
    with pytest.raises(ValueError, match="level must be in 0..3"):
        count_slide(SLIDES / "boxes.tiff", model, level=4, progress=False, backend="eager")
    with pytest.raises(ValueError, match="does not record its microns per pixel"):
        count_slide(np.zeros((8, 8, 3), np.uint8), model, mpp=0.5, progress=False, backend="eager")


def test_unreadable_svs_names_the_file(model):
    for mask in ("auto", None):
        with pytest.raises(SlideReadError, match="unreadable.svs.*Bogus marker length"):
            count_slide(SLIDES / "unreadable.svs", model, mask=mask, progress=False, backend="eager")


def test_unopenable_tiff_names_the_file_and_both_readers(model):
    with pytest.raises(SlideReadError, match=r"unopenable\.tiff.*tifffile.*OpenSlide.*52479"):
        count_slide(SLIDES / "unopenable.tiff", model, progress=False, backend="eager")


def test_missing_and_unsupported_files(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        count_slide(tmp_path / "nope.svs", model, progress=False, backend="eager")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(SlideReadError, match="junk.png"):
        count_slide(junk, model, progress=False, backend="eager")
    with pytest.raises(SlideReadError, match="directory"):
        count_slide(tmp_path, model, progress=False, backend="eager")
    with pytest.raises(TypeError, match="source must be a path"):
        count_slide(12, model, progress=False, backend="eager")


def test_bad_arrays(model):
    with pytest.raises(ValueError, match="empty"):
        count_slide(np.zeros((0, 5, 3), np.uint8), model, progress=False, backend="eager")
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        count_slide(np.zeros((5, 5, 2), np.uint8), model, progress=False, backend="eager")
    with pytest.raises(TypeError, match="dtype bool"):
        count_slide(np.zeros((5, 5), bool), model, progress=False, backend="eager")
    with pytest.raises(ValueError, match="HxW or HxWxC"):
        count_slide(np.zeros((5, 5, 3, 1), np.uint8), model, progress=False, backend="eager")
    with pytest.raises(TypeError, match="numpy"):
        count_slide(torch.zeros(3, 5, 5), model, progress=False, backend="eager")


def test_16bit_rgba_file_and_array(model, tmp_path):
    import tifffile

    rng = np.random.default_rng(1)
    a16 = rng.integers(0, 65536, (40, 50, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "x16.tif", a16, photometric="rgb", extrasamples=["unassalpha"], tile=(16, 16))
    expect = a16[:, :, :3].astype(np.float32) / np.float32(257)  # the pixel rule: uint16 / 257, unrounded
    ref, scale = whole(model, expect)
    for src in (tmp_path / "x16.tif", a16):
        res = count_slide(src, model, tile=32, mask=None, progress=False, backend="eager")
        assert abs(res.total - ref) <= 1e-5 * scale


def test_zarr_and_dask_sources(model):
    import dask.array as da
    import zarr

    img = np.random.default_rng(2).integers(0, 256, (70, 45, 3), dtype=np.uint8)
    ref, scale = whole(model, img)
    z = zarr.create_array(store=zarr.storage.MemoryStore(), shape=img.shape, chunks=(16, 16, 3), dtype="uint8")
    z[:] = img
    d = da.from_array(img, chunks=(20, 20, 3))
    for src in (z, d):
        assert isinstance(open_reader(src), ArrayReader)
        res = count_slide(src, model, tile=32, mask=None, progress=False, batch_size=2, backend="eager")
        assert abs(res.total - ref) <= 1e-5 * scale


def test_region_outside_level_is_rejected():
    r = ArrayReader(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="outside level 0"):
        r.read_region(0, 5, 5, 6, 2)


def test_ome_tiff_pyramid_with_mpp(model, tmp_path):
    import tifffile

    from fastcount.data.synth import cell_image

    img, _ = cell_image((96, 130), seed=3)  # smooth content: JPEG keeps it close
    path = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(img, subifds=1, tile=(32, 32), photometric="rgb", compression="jpeg",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": 0.25, "PhysicalSizeYUnit": "µm"})
        tif.write(img[::2, ::2], subfiletype=1, tile=(32, 32), photometric="rgb", compression="jpeg")
    r = open_reader(path)
    assert isinstance(r, TiffReader) and r.level_shapes == [(96, 130), (48, 65)]
    assert r.mpp == pytest.approx(0.25)
    full = r.read_region(0, 0, 0, 96, 130)
    assert np.abs(full.astype(int) - img.astype(int)).mean() < 4  # JPEG, decoded through imagecodecs
    r.close()
    ref, scale = whole(model, full)
    res = count_slide(path, model, mpp=0.25, tile=48, mask=None, progress=False, backend="eager")
    assert res.level == 0 and abs(res.total - ref) <= 1e-5 * scale
    assert count_slide(path, model, mpp=0.5, tile=48, mask=None, progress=False, backend="eager").level == 1
