"""Every slide source the README lists, read through fastcount at several regions and checked
against pixels fastcount did not produce (another decoder, or the generator's own pixels):
the fixture SVS / DICOM / tiled TIFF / PNG, and NDPI, multi-level SVS, pyramidal TIFF, JPEG
and ``.zarr`` folders written here."""
import io
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import SLIDES, whole_count as whole
from fastcount import count_slide
from fastcount.slide import ArrayReader, ImageReader, OpenSlideReader, SlideReadError, TiffReader, open_reader

pytestmark = pytest.mark.usefixtures("one_thread")

# (y, x, h, w) boxes of the 16x16 fixtures: corners, edges, one pixel, odd sizes, the whole image.
BOXES_16 = [(0, 0, 16, 16), (0, 0, 1, 1), (15, 15, 1, 1), (3, 5, 7, 9), (0, 9, 16, 7), (11, 0, 5, 16), (6, 6, 4, 3)]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def svs_pixels():
    """small.svs decoded by tifffile + imagecodecs (OpenSlide plays no part)."""
    import tifffile

    return tifffile.imread(SLIDES / "small.svs")


def dicom_frame_pixels(path):
    """The one frame of a baseline-JPEG DICOM (transfer syntax 1.2.840.10008.1.2.4.50), decoded
    by PIL: the frame is the only JPEG stream in the file, from its SOI to its EOI marker."""
    data = path.read_bytes()
    start, end = data.find(b"\xff\xd8\xff"), data.rfind(b"\xff\xd9") + 2
    assert 0 < start < end, f"no JPEG frame in {path}"
    return np.asarray(Image.open(io.BytesIO(data[start:end])).convert("RGB"))


def png_pixels():
    return np.asarray(Image.open(SLIDES / "boxes.png").convert("RGB"))


# The files' own reference pixels, from decoders fastcount does not use for that file.
REFERENCE = {"small.svs": svs_pixels, "boxes_0.dcm": svs_pixels, "boxes_1.dcm": svs_pixels,
             "boxes.tiff": png_pixels, "boxes.png": png_pixels}


def test_dicom_pixels_equal_svs_pixels_in_every_region():
    svs = svs_pixels()
    assert svs.shape == (16, 16, 3)
    # The DICOM frame is a 64x64 tile holding the 16x16 image: PIL decodes it to the SVS pixels.
    np.testing.assert_array_equal(dicom_frame_pixels(SLIDES / "boxes_0.dcm")[:16, :16], svs)
    readers = [OpenSlideReader(SLIDES / "small.svs"), TiffReader(SLIDES / "small.svs"),
               open_reader(SLIDES / "boxes_0.dcm"), open_reader(SLIDES / "boxes_1.dcm")]
    # boxes_1.dcm is the series' thumbnail instance: OpenSlide opens the whole series from it.
    assert all(isinstance(r, OpenSlideReader) for r in readers[2:])
    for r in readers:
        assert r.level_shapes == [(16, 16)] and r.mpp == pytest.approx(0.499), r
        for y, x, h, w in BOXES_16:
            np.testing.assert_array_equal(r.read_region(0, y, x, h, w), svs[y : y + h, x : x + w],
                                          err_msg=f"{r.name} box {(y, x, h, w)}")
        r.close()


def test_generic_tiff_regions_across_tile_seams_match_png():
    png = png_pixels()
    assert png.shape == (250, 300, 3)
    # boxes.tiff has 64x64 tiles: these boxes start, end and straddle tile seams and the far edges.
    boxes = [(60, 60, 10, 10), (63, 127, 66, 3), (0, 250, 250, 50), (192, 0, 58, 300), (1, 1, 200, 255),
             (249, 299, 1, 1), (64, 64, 64, 64)]
    for r in (TiffReader(SLIDES / "boxes.tiff"), OpenSlideReader(SLIDES / "boxes.tiff")):
        for y, x, h, w in boxes:
            np.testing.assert_array_equal(r.read_region(0, y, x, h, w), png[y : y + h, x : x + w],
                                          err_msg=f"{type(r).__name__} box {(y, x, h, w)}")
        r.close()


@pytest.mark.parametrize("name, reader, tile, n_tiles", [
    ("small.svs", None, 16, 9), ("small.svs", TiffReader, 16, 9), ("boxes_0.dcm", None, 16, 9),
    ("boxes_1.dcm", None, 16, 9), ("boxes.tiff", None, 96, 12), ("boxes.tiff", OpenSlideReader, 96, 12),
    ("boxes.png", None, 96, 12)])
def test_fixture_slides_count_over_several_tiles(model, name, reader, tile, n_tiles):
    # A 16x16 image has a 48x48 count map: tile=16 splits it into 3x3 tiles.
    ref, scale = whole(model, REFERENCE[name]())
    source = SLIDES / name if reader is None else reader(SLIDES / name)  # None: the reader open_reader picks
    res = count_slide(source, model, tile=tile, mask=None, progress=False, backend="eager")
    assert res.stats["tiles_processed"] == n_tiles
    assert abs(res.total - ref) <= 1e-5 * scale


# ------------------------------------------------------------------ NDPI written here

def _tag(tag, typ, count, value):
    """A classic TIFF IFD entry; SHORT scalars sit left-justified in the value field."""
    if typ == 3 and count == 1:
        return struct.pack("<HHIHH", tag, typ, count, value, 0)
    return struct.pack("<HHII", tag, typ, count, value)


def write_ndpi(path, levels, mpp, lens=20.0):
    """A Hamamatsu NDPI: a little-endian classic TIFF whose first directory carries the NDPI
    format tag (65420), one baseline JPEG strip per pyramid level (finest first), each
    directory with a source-lens (65421) and focal-plane (65424) tag, and NDPI's 64-bit
    directory offsets (the header and every next-directory offset take 8 bytes, followed
    by a block of high offset bits, all 0 in a file under 4 GiB).
    Returns the JPEG streams written, one per level."""
    out = bytearray(b"II*\x00" + bytes(8))
    next_at, jpegs = 4, []
    for k, a in enumerate(levels):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=92)
        jpeg = buf.getvalue()
        jpegs.append(jpeg)
        h, w = a.shape[:2]
        strip = len(out)
        out += jpeg + bytes(len(jpeg) % 2)
        bps, res, make = len(out), len(out) + 6, len(out) + 14
        out += struct.pack("<3H", 8, 8, 8) + struct.pack("<2I", round(1e7 / (mpp * 2**k)), 1000) + b"Hamamatsu\x00"
        lens_bits = struct.unpack("<I", struct.pack("<f", lens))[0]
        tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bps), (259, 3, 1, 7), (262, 3, 1, 6),
                (271, 2, 10, make), (273, 4, 1, strip), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(jpeg)),
                (282, 5, 1, res), (283, 5, 1, res), (296, 3, 1, 3)]  # resolution in pixels per cm
        tags += [(65420, 4, 1, 1)] if k == 0 else []
        tags += [(65421, 11, 1, lens_bits), (65424, 9, 1, 0)]
        struct.pack_into("<I", out, next_at, len(out))
        out += struct.pack("<H", len(tags)) + b"".join(_tag(*t) for t in tags)
        next_at = len(out)
        out += bytes(8 + 4 * len(tags))
    path.write_bytes(bytes(out))
    return jpegs


def test_ndpi_opens_as_hamamatsu_and_counts(model, tmp_path):
    import openslide
    import tifffile

    from fastcount.data.synth import cell_image

    img, _ = cell_image((100, 136), seed=5)
    path = tmp_path / "x.ndpi"
    jpegs = write_ndpi(path, [img, np.ascontiguousarray(img[::2, ::2])], mpp=0.25)
    assert openslide.OpenSlide.detect_format(str(path)) == "hamamatsu"
    with tifffile.TiffFile(path) as t:
        assert t.series[0].kind == "ndpi"
    ref = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]  # PIL's decode of each strip
    # Both NDPI readers: OpenSlide adds a level of its own below a small non-tiled NDPI level.
    for r, shapes in [(OpenSlideReader(path), [(100, 136), (50, 68), (25, 34)]), (TiffReader(path), [(100, 136), (50, 68)])]:
        assert r.level_shapes == shapes and r.mpp == pytest.approx(0.25), r
        for lv, boxes in [(0, [(0, 0, 100, 136), (7, 33, 50, 61), (99, 135, 1, 1)]), (1, [(0, 0, 50, 68), (3, 40, 40, 28)])]:
            for y, x, h, w in boxes:
                np.testing.assert_array_equal(r.read_region(lv, y, x, h, w), ref[lv][y : y + h, x : x + w],
                                              err_msg=f"{r!r} level {lv} box {(y, x, h, w)}")
        r.close()
    for reader in (None, OpenSlideReader):
        for lv in (0, 1):
            want, scale = whole(model, ref[lv])
            source = path if reader is None else reader(path)
            res = count_slide(source, model, mpp=0.25 * 2**lv, tile=48, mask=None, progress=False, backend="eager")
            assert res.level == lv and res.stats["tiles_processed"] > 1
            assert abs(res.total - want) <= 1e-5 * scale


def write_svs(path, levels, mpp):
    """An Aperio SVS: tiled JPEG levels (finest first), the thumbnail strip as the second
    directory, and descriptions that start with "Aperio" and state the MPP."""
    import tifffile

    h0, w0 = levels[0].shape[:2]
    head = f"Aperio Image Library v12.0.0\r\n{w0}x{h0} [0,0 {w0}x{h0}] (64x64) JPEG/RGB Q=90"
    with tifffile.TiffWriter(path) as tif:
        for k, a in enumerate(levels):
            if k == 1:
                thumb = np.ascontiguousarray(levels[0][::4, ::4])
                tif.write(thumb, photometric="rgb", compression="jpeg", description=f"{head} -> thumbnail|MPP = {mpp}",
                          metadata=None)
            desc = f"{head}|AppMag = 20|MPP = {mpp}" if k == 0 else f"{head} -> {a.shape[1]}x{a.shape[0]}|MPP = {mpp}"
            tif.write(np.ascontiguousarray(a), tile=(64, 64), photometric="rgb", compression="jpeg",
                      description=desc, metadata=None)


def test_svs_levels_read_as_stored(model, tmp_path):
    import openslide
    import tifffile

    from fastcount.data.synth import cell_image

    img, _ = cell_image((203, 250), seed=8)
    path = tmp_path / "x.svs"
    write_svs(path, [img, img[::2, ::2]], mpp=0.5)  # level 1 is 102 x 125: downsamples 1.990 and 2
    assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
    with tifffile.TiffFile(path) as t:
        assert t.series[0].kind == "svs"
        stored = [lv.asarray() for lv in t.series[0].levels]  # each level decoded whole
    assert np.abs(stored[1].astype(int) - img[::2, ::2]).mean() < 4
    r = open_reader(path)
    assert r.level_shapes == [(203, 250), (102, 125)] and r.mpp == pytest.approx(0.5)
    # OpenSlide would interpolate this level (its mean downsample, 1.995, is not a whole number,
    # so level-0 corners fall between level-1 pixels); the reader must return the stored pixels.
    for y, x, h, w in [(0, 0, 102, 125), (60, 60, 10, 10), (3, 5, 70, 61), (101, 124, 1, 1), (63, 0, 2, 125)]:
        np.testing.assert_array_equal(r.read_region(1, y, x, h, w), stored[1][y : y + h, x : x + w],
                                      err_msg=f"level 1 box {(y, x, h, w)}")
    r.close()
    want, scale = whole(model, stored[1])
    res = count_slide(path, model, level=1, tile=48, mask=None, progress=False, backend="eager")
    assert res.stats["tiles_processed"] > 1 and abs(res.total - want) <= 1e-5 * scale


# ------------------------------------------------------------------ JPEG and .zarr folders

def test_jpeg_file_counts_as_its_decoded_array(model, tmp_path):
    from fastcount.data.synth import cell_image

    img, _ = cell_image((70, 91), seed=6)
    for name in ("x.jpg", "x.jpeg"):
        Image.fromarray(img).save(tmp_path / name, format="JPEG", quality=90)
        decoded = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert np.abs(decoded.astype(int) - img.astype(int)).mean() < 4  # it is the image, JPEG-compressed
        r = open_reader(tmp_path / name)
        assert isinstance(r, ImageReader)
        np.testing.assert_array_equal(r.read_region(0, 5, 7, 40, 50), decoded[5:45, 7:57])
        ref, scale = whole(model, decoded)
        from_path = count_slide(tmp_path / name, model, tile=48, mask=None, progress=False, backend="eager")
        from_array = count_slide(decoded, model, tile=48, mask=None, progress=False, backend="eager")
        assert from_path.stats["tiles_processed"] > 1
        assert abs(from_path.total - ref) <= 1e-5 * scale and abs(from_path.total - from_array.total) <= 1e-9 * scale


def test_zarr_folder_counts_as_its_array(model, tmp_path):
    import zarr

    img = np.random.default_rng(7).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    path = tmp_path / "x.zarr"
    z = zarr.create_array(store=str(path), shape=img.shape, chunks=(16, 16, 3), dtype="uint8")
    z[:] = img
    r = open_reader(path)
    assert isinstance(r, ArrayReader) and r.level_shapes == [(45, 70)]
    np.testing.assert_array_equal(r.read_region(0, 9, 17, 30, 40), img[9:39, 17:57])
    ref, scale = whole(model, img)
    res = count_slide(path, model, tile=32, mask=None, progress=False, backend="eager")
    assert res.stats["tiles_processed"] > 1 and abs(res.total - ref) <= 1e-5 * scale
    assert res.source == str(path)


def test_zarr_folder_that_is_not_an_array_is_named(model, tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("0", shape=(8, 8, 3), dtype="uint8")
    with pytest.raises(SlideReadError, match=r"g\.zarr is a zarr group.*'0'"):
        count_slide(tmp_path / "g.zarr", model, mask=None, progress=False, backend="eager")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(SlideReadError, match=r"empty\.zarr.*zarr"):
        count_slide(tmp_path / "empty.zarr", model, mask=None, progress=False, backend="eager")


def test_pyramidal_tiff_regions_equal_the_generated_pixels(tmp_path):
    from fastcount.data.synth import write_synthetic_slide

    info = write_synthetic_slide(tmp_path / "s.tif", (300, 420), seed=4, tile=64, tissue_fraction=0.5,
                                 min_level_side=110)
    slide, shapes = info["slide"], info["levels"]
    assert shapes == [(300, 420), (150, 210), (75, 105)]
    r = open_reader(info["path"])
    assert isinstance(r, TiffReader) and r.level_shapes == shapes and r.mpp == pytest.approx(0.5)
    for lv, (H, W) in enumerate(shapes):
        # The writer renders tile by tile (zlib, lossless): the level is its tiles side by side.
        level = np.concatenate([np.concatenate([slide.render(y, x, min(64, H - y), min(64, W - x), 2**lv)
                                                for x in range(0, W, 64)], axis=1) for y in range(0, H, 64)])
        for y, x, h, w in [(0, 0, H, W), (60, 60, 10, 10), (H - 1, W - 1, 1, 1), (33, 63, H - 40, 2)]:
            np.testing.assert_array_equal(r.read_region(lv, y, x, h, w), level[y : y + h, x : x + w],
                                          err_msg=f"level {lv} box {(y, x, h, w)}")
    r.close()
