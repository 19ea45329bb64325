import numpy as np
import pytest
from PIL import Image

from fastcount.data import load_dataset, read_dots, read_image
from conftest import DATASETS


@pytest.fixture(scope="module")
def vgg():
    return load_dataset("vgg_cells", DATASETS)


def test_vgg_counts_exact(vgg):
    assert len(vgg) == 200
    assert int(vgg.counts.sum()) == 35_192
    assert vgg.counts.min() == 74 and vgg.counts.max() == 317
    img, dots = vgg[0]
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    assert dots.shape == (256, 256) and np.issubdtype(dots.dtype, np.integer)
    assert vgg.names == sorted(vgg.names) and vgg.names[0] == "001cell.png"
    assert vgg.test_size == 100


def test_mbm_counts_exact_full_and_halved():
    full = load_dataset("mbm", DATASETS / "mbm")
    assert len(full) == 44 and int(full.counts.sum()) == 5_553
    assert full[0][0].shape == (600, 600, 3)
    half = load_dataset("mbm", DATASETS, halve=True)
    assert half[0][0].shape == (300, 300, 3) and half[0][1].shape == (300, 300)
    assert np.array_equal(half.counts, full.counts)  # 2x2 sum-pooling keeps every dot
    assert half.test_size == 11


@pytest.mark.parametrize("quality", [95, 80])
def test_lossy_jpeg_dots_recovered(tmp_path, quality):
    total_png = total_jpg = 0
    for i in range(1, 6):
        a = np.array(Image.open(DATASETS / "vgg_cells" / f"{i:03d}dots.png"))
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(a).save(p, quality=quality, subsampling=0)
        total_png += int((a[..., 0] == 255).sum())
        total_jpg += int(read_dots(p).sum())
    assert total_jpg == total_png


def test_generic_folder_with_png_csv_geojson_jpeg(tmp_path, vgg):
    rng = np.random.default_rng(0)
    img = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    # a: red-dot PNG; b: CSV with header; c: GeoJSON; d: 1-bit dot PNG; e: JPEG dots
    Image.fromarray(img).save(tmp_path / "a.png")
    dots_rgb = np.zeros_like(img)
    dots_rgb[3, 4] = dots_rgb[10, 20] = (255, 0, 0)
    Image.fromarray(dots_rgb).save(tmp_path / "a_dots.png")
    Image.fromarray(img).save(tmp_path / "b.png")
    (tmp_path / "b.csv").write_text("row,col\n1,2\n1,2\n39,49\n")
    Image.fromarray(img).save(tmp_path / "c.tif")
    (tmp_path / "c_dots.geojson").write_text(
        '{"type":"FeatureCollection","features":[{"type":"Feature","geometry":{"type":"Point","coordinates":[7,5]}}]}')
    Image.fromarray(img).save(tmp_path / "d.png")
    Image.fromarray(np.eye(40, 50, dtype=bool)).save(tmp_path / "d_dots.png")
    Image.fromarray(img).save(tmp_path / "e.png")
    Image.fromarray(dots_rgb).save(tmp_path / "edots.jpg", quality=90, subsampling=0)
    ds = load_dataset("folder", tmp_path)
    assert ds.names == ["a.png", "b.png", "c.tif", "d.png", "e.png"]
    assert ds.counts.tolist() == [2, 3, 1, 40, 2]
    assert ds[1][1][1, 2] == 2
    assert ds[2][1][5, 7] == 1  # GeoJSON (x=7, y=5) -> row 5, col 7


def test_bad_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="x.png"):
        read_image(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="no dot annotation found"):
        load_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(FileNotFoundError):
        load_dataset("vgg_cells", tmp_path / "missing")
    (tmp_path / "p.csv").write_text("1,2\n100,3\n")
    with pytest.raises(ValueError, match="outside the image"):
        read_dots(tmp_path / "p.csv", (10, 10))
    (tmp_path / "q.csv").write_text("1,2\nfoo,bar\n")
    with pytest.raises(ValueError, match="q.csv:2"):
        read_dots(tmp_path / "q.csv", (10, 10))
    with pytest.raises(ValueError, match="shape"):
        read_dots(tmp_path / "p.csv")


def test_image_conversions(tmp_path):
    g = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(12, 10)
    Image.fromarray(g).save(tmp_path / "g.png")
    a = read_image(tmp_path / "g.png")
    assert a.shape == (12, 10, 3) and np.array_equal(a[..., 0], g) and np.array_equal(a[..., 2], g)
    rgba = np.dstack([np.full((5, 6, 3), 7, np.uint8), np.zeros((5, 6), np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").shape == (5, 6, 3)
    g16 = np.full((4, 4), 65535, np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png").max() == 255
