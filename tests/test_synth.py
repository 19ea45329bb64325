"""Synthetic fluorescence cells and pyramidal slides."""
import numpy as np
import pytest

from fastcount.data.synth import BLOCK, SyntheticSlide, cell_image, write_synthetic_slide


def test_cell_image_looks_like_vgg_and_has_exact_dots():
    img, dots = cell_image(256, seed=0)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    assert dots.shape == (256, 256) and dots.dtype == np.int64
    # Signal almost all in blue, as in the VGG benchmark.
    r, g, b = (img[:, :, c].astype(float).mean() for c in range(3))
    assert b > 8 * max(r, g) and 20 < b < 150
    # Poisson around the VGG mean (176 per image); deterministic for a seed.
    assert 120 < dots.sum() < 240
    img2, dots2 = cell_image(256, seed=0)
    assert (img2 == img).all() and (dots2 == dots).all()
    img3, dots3 = cell_image((40, 70), n_cells=17, seed=1)
    assert img3.shape == (40, 70, 3) and dots3.sum() == 17
    # Cells are bright where the dots are.
    ys, xs = np.nonzero(dots)
    assert img[ys, xs, 2].astype(float).mean() > img[:, :, 2].mean() + 40


def test_cell_image_errors():
    with pytest.raises(ValueError, match="size"):
        cell_image(0)
    with pytest.raises(ValueError, match="n_cells"):
        cell_image(16, n_cells=-1)


def test_slide_regions_render_consistently_and_total_is_exact():
    s = SyntheticSlide(700, 900, seed=4, tissue_fraction=0.3, n_regions=2)
    whole = s.render(0, 0, 700, 900)
    part = s.render(300, 250, 200, 333)
    # Cells are identical across region boundaries; only the noise field differs per region.
    diff = np.abs(whole[300:500, 250:583].astype(int) - part.astype(int))
    assert np.median(diff) <= 3 and diff.mean() < 3
    dots = s.dots()
    assert dots.sum() == s.total > 0
    ys, xs = np.nonzero(dots)
    assert s.in_tissue(ys + 0.5, xs + 0.5).mean() > 0.95  # cells live in tissue
    assert whole[:, :, 2][s.in_tissue(*np.mgrid[0:700, 0:900] + 0.5)].mean() > 3 * whole[:, :, 2][
        ~s.in_tissue(*np.mgrid[0:700, 0:900] + 0.5)].mean()


def test_write_pyramid_tile_by_tile(tmp_path):
    import tifffile

    info = write_synthetic_slide(tmp_path / "s.tif", (600, 1000), seed=2, tissue_fraction=0.2, tile=128,
                                 min_level_side=128)
    assert info["levels"] == [(600, 1000), (300, 500), (150, 250), (75, 125)]
    with tifffile.TiffFile(info["path"]) as tif:
        lv = tif.series[0].levels
        assert [x.shape[:2] for x in lv] == info["levels"]
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 128
        a0 = lv[0].asarray()
    s = info["slide"]
    # Level 0 in the file is what the slide renders tile by tile.
    np.testing.assert_array_equal(a0[:128, 128:256], s.render(0, 128, 128, 128))
    assert info["total"] == s.dots().sum()
    from fastcount.slide import open_reader

    r = open_reader(info["path"])
    assert r.mpp == pytest.approx(0.5, rel=1e-6) and r.downsamples[:2] == [1.0, 2.0]
    # Coarser levels are the 2x average of finer ones (up to noise and cell-sampling approximation).
    l1 = r.read_region(1, 0, 0, 300, 500).astype(float)
    pooled = a0.reshape(300, 2, 500, 2, 3).mean(axis=(1, 3))
    assert np.abs(l1 - pooled)[:, :, 2].mean() < 4
    r.close()


def test_block_generation_is_independent_of_render_order():
    s = SyntheticSlide(3 * BLOCK, 2 * BLOCK, seed=9, tissue_fraction=0.5)
    a = s.render(BLOCK, 0, BLOCK, BLOCK)
    s.render(0, 0, 3 * BLOCK, 2 * BLOCK)
    b = s.render(BLOCK, 0, BLOCK, BLOCK)
    assert (a == b).all()
