"""Users' own annotations: layouts, CSV/GeoJSON points, slide regions, held-out tests, fine-tuning."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fastcount
from fastcount.cli import main
from fastcount.data import load_dataset, load_slide_regions, read_dots, read_points
from fastcount.data.synth import cell_image
from fastcount.io import read_metadata, save_model
from fastcount.train import TrainConfig, load_init_weights, split_indices, held_out_indices, train

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(0)
IMG = (RNG.random((40, 50, 3)) * 255).astype(np.uint8)


def _qupath_point(x, y, cls=None, multi=False):
    geom = {"type": "MultiPoint", "coordinates": [[x, y], [x + 2, y]]} if multi else {"type": "Point", "coordinates": [x, y]}
    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geom, "properties": props}


def _qupath_rect(x, y, w, h, cls=None):
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    props = {"classification": {"name": cls}} if cls else {}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}


def _write_geojson(path, feats):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


@pytest.mark.parametrize("ann_dir", ["annotations", "dots", "labels"])
def test_sibling_folder_layout_with_every_annotation_format(tmp_path, ann_dir):
    (tmp_path / "images").mkdir()
    ann = tmp_path / ann_dir
    ann.mkdir()
    red = np.zeros_like(IMG)
    red[3, 4] = red[10, 20] = (255, 0, 0)
    for name in "abcde":
        Image.fromarray(IMG).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(red).save(ann / "a.png")                         # exact dot image, same name
    (ann / "b.csv").write_text("x,y\n2,1\n2.7,1.2\n49,39\n")          # x = column
    _write_geojson(ann / "c.geojson", [_qupath_point(7, 5, "Tumor"), _qupath_point(1, 1, "Stroma", multi=True)])
    Image.fromarray(red).save(ann / "d_dots.jpg", quality=90, subsampling=0)  # lossy dots, _dots suffix
    (ann / "e.csv").write_text("row,col,class\n5,6,Tumor\n7,8,Stroma\n")
    ds = load_dataset("folder", tmp_path)
    assert ds.names == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert ds.counts.tolist() == [2, 3, 3, 2, 2]
    assert ds[1][1][1, 2] == 2 and ds[1][1][39, 49] == 1             # (x 2.7, y 1.2) floors to (row 1, col 2)
    assert ds[2][1][5, 7] == 1 and ds[2][1][1, 1] == 1 and ds[2][1][1, 3] == 1
    with pytest.raises(ValueError, match="no 'class' column"):  # b.csv cannot be filtered by class
        load_dataset("folder", tmp_path, classes="Tumor")
    for name in "abd":
        (tmp_path / "images" / f"{name}.png").unlink()
    tumor = load_dataset("folder", tmp_path, classes="Tumor")
    assert tumor.counts.tolist() == [1, 1] and tumor[0][1][5, 7] == 1 and tumor[1][1][5, 6] == 1


def test_csv_headers_and_errors(tmp_path):
    (tmp_path / "xy.csv").write_text("X,Y,score\n3,1,0.9\n")
    (tmp_path / "rc.csv").write_text("row,col\n3,1\n")
    (tmp_path / "plain.csv").write_text("3,1\n")
    assert read_points(tmp_path / "xy.csv").tolist() == [[1.0, 3.0]]
    assert read_points(tmp_path / "rc.csv").tolist() == [[3.0, 1.0]]
    assert read_points(tmp_path / "plain.csv").tolist() == [[3.0, 1.0]]  # no header: row,col
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="names no coordinate columns"):
        read_points(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no 'class' column"):
        read_points(tmp_path / "rc.csv", classes="Tumor")


def test_continuous_coordinates_floor_to_pixels(tmp_path):
    """Pixel (x, y) covers [x, x+1) x [y, y+1): y = 255.5 in 256 rows is row 255, not outside."""
    gj = _write_geojson(tmp_path / "p.geojson", [_qupath_point(0.99, 255.5), _qupath_point(10.0, 0.0)])
    d = read_dots(gj, (256, 256))
    assert d[255, 0] == 1 and d[0, 10] == 1 and d.sum() == 2
    out = _write_geojson(tmp_path / "q.geojson", [_qupath_point(3, 256.0)])
    with pytest.raises(ValueError, match="outside the image"):
        read_dots(out, (256, 256))


def test_no_pairing_lists_what_was_found(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(IMG).save(tmp_path / "images" / "slide1.png")
    (tmp_path / "annotations" / "slide_1.csv").write_text("x,y\n1,1\n")
    with pytest.raises(ValueError) as e:
        load_dataset("folder", tmp_path)
    msg = str(e.value)
    assert "no dot annotation found for 1 of 1 images (slide1.png)" in msg and "slide_1.csv" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found.*notes.txt"):
        load_dataset("folder", empty)


@pytest.fixture(scope="module")
def tiled_slide(tmp_path_factory):
    """A 2-level tiled TIFF (256x320 and 128x160) with random pixels."""
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path_factory.mktemp("slide") / "s.tiff"
    base = (np.random.default_rng(1).random((256, 320, 3)) * 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, tile=(64, 64), subifds=1, photometric="rgb")
        tif.write(base[::2, ::2].copy(), tile=(64, 64), subfiletype=1, photometric="rgb")
    return path, base


def test_slide_regions_from_qupath_geojson(tmp_path, tiled_slide):
    path, base = tiled_slide
    feats = [_qupath_rect(32, 16, 64, 48, "Region"),                     # x 32..96, y 16..64
             {"type": "Feature", "properties": {"classification": {"name": "Region"}},
              "geometry": {"type": "Polygon", "coordinates": [[[200, 100], [300, 100], [200, 200], [200, 100]]]}},
             _qupath_point(40.5, 20.5, "Cell"), _qupath_point(95.9, 63.9, "Cell"),  # inside the rectangle
             _qupath_point(50, 30, "Debris"),                                   # other class
             _qupath_point(210, 110, "Cell"), _qupath_point(290, 190, "Cell"),  # triangle: in, out
             _qupath_point(5, 5, "Cell")]                                       # outside every region
    gj = _write_geojson(tmp_path / "ann.geojson", feats)
    ds = load_slide_regions(path, gj, classes="Cell")
    assert len(ds) == 2 and ds.counts.tolist() == [2, 1] and not ds._images  # nothing read yet
    img, dots = ds[0]
    assert np.array_equal(img, base[16:64, 32:96]) and dots[4, 8] == 1 and dots[47, 63] == 1
    tri, tri_dots = ds[1]
    assert tri.shape == (100, 100, 3) and tri_dots[10, 10] == 1
    assert (tri[90, 90] == 255).all() and np.array_equal(tri[5, 5], base[105, 205])  # outside the triangle: fill
    assert load_slide_regions(path, gj).counts.tolist() == [3, 1]                 # no class filter
    half = load_slide_regions(path, gj, classes="Cell", level=1)
    assert half[0][0].shape == (24, 32, 3) and half.counts.tolist() == [2, 1]
    assert np.array_equal(half[0][0], base[::2, ::2][8:32, 16:48]) and half[0][1][2, 4] == 1
    boxes = load_slide_regions(path, gj, regions=[(0, 0, 16, 16)], classes="Cell")
    assert boxes.counts.tolist() == [1] and boxes[0][1][5, 5] == 1
    with pytest.raises(ValueError, match="no region"):
        load_slide_regions(path, gj, region_classes="Nope")
    with pytest.raises(ValueError, match="level must be"):
        load_slide_regions(path, gj, level=5)


def test_train_on_slide_regions_from_the_command_line(tmp_path, tiled_slide, capsys):
    path, _ = tiled_slide
    gj = _write_geojson(tmp_path / "a.geojson", [_qupath_rect(0, 0, 64, 64), _qupath_rect(64, 64, 64, 64),
                                                 _qupath_point(10, 10, "Cell"), _qupath_point(70, 70, "Cell")])
    out = tmp_path / "w.safetensors"
    assert main(["train", "--dataset", "slide", "--data-root", str(path), "--annotations", str(gj), "--level", "1",
                 "--point-class", "Cell", "--n-train", "1", "--n-val", "1", "--epochs", "1", "--crop", "24",
                 "--width", "0.0625", "--bn-recal", "1", "--batch-size", "1", "--quiet", "--bf16-calibrate", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "SlideRegionDataset(name='s', regions=2, level=1, dots=2)" in capsys.readouterr().out
    split = json.loads(read_metadata(out)["split"])
    assert sorted(split["train"] + split["val"]) == ["region000_x0_y0_L1", "region001_x32_y32_L1"]


def _folder_dataset(root, n=6, size=48):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, dots = cell_image(size, seed=i)
        Image.fromarray(img).save(root / f"im{i}.png")
        r, c = np.nonzero(dots)
        (root / f"im{i}.csv").write_text("x,y\n" + "".join(f"{x + 0.5},{y + 0.5}\n" for y, x in zip(r, c)))
    return root


def test_held_out_split_is_seeded_and_recorded():
    class Named:
        names = [f"n{i}" for i in range(10)]
        test_size = 0

        def __len__(self):
            return 10

    t = held_out_indices(Named(), 3, seed=1)
    assert len(t) == 3 and t == held_out_indices(Named(), 3, seed=1) and t != held_out_indices(Named(), 3, seed=2)
    assert held_out_indices(Named(), ["n7", "n2"]) == [2, 7]
    tr, va, te = split_indices(10, 0, 4, 2, 0, test=t)
    assert te == t and not (set(tr) | set(va)) & set(t)
    with pytest.raises(ValueError, match="not in the dataset"):
        held_out_indices(Named(), ["zz"])
    # the default split of the reference datasets is unchanged by the new argument
    assert split_indices(44, 11, 15, 15, 0) == split_indices(44, 11, 15, 15, 0, test=range(33, 44))


def test_folder_training_reports_test_mae_and_evaluate_reproduces_it(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "data")
    out = tmp_path / "w.safetensors"
    common = ["--dataset", "folder", "--data-root", str(root), "--device", "cpu"]
    assert main(["train", *common, "--n-train", "2", "--n-val", "1", "--n-test", "2", "--epochs", "1",
                 "--width", "0.0625", "--quiet", "--bf16-calibrate", "0", "--bn-recal", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert "test = 2 images drawn with --seed" in text[0] and "on 2 images" in text[-1]
    line = text[-1]
    mae = float(line.split("test MAE ")[1].split()[0])
    meta = read_metadata(out)
    split = json.loads(meta["split"])
    assert len(split["test"]) == 2 and not set(split["test"]) & set(split["train"] + split["val"])
    assert abs(float(meta["test_mae"]) - mae) < 1e-3
    assert main(["evaluate", *common, "--weights", str(out)]) == 0
    ev = capsys.readouterr().out
    assert "recorded in the weights" in ev and abs(float(ev.split("test MAE ")[1].split(",")[0]) - mae) < 2e-3
    # testing on images the weights were trained on is refused
    assert main(["evaluate", *common, "--weights", str(out), "--test-images", split["train"][0]]) == 2
    assert "used to train or validate" in capsys.readouterr().err


def test_init_copies_weights_and_refuses_a_mismatch(tmp_path):
    src = fastcount.CountCeption(width=0.0625)
    w = save_model(src, tmp_path / "src.safetensors")
    dst = fastcount.CountCeption(width=0.0625)
    load_init_weights(dst, str(w))
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(ValueError, match=r"width 0.0625 \(init\) vs 0.125"):
        load_init_weights(fastcount.CountCeption(width=0.125), str(w))
    with pytest.raises(ValueError, match="stride 1 \\(init\\) vs 2"):
        load_init_weights(fastcount.CountCeption(width=0.0625, stride=2), str(w))
    ds = load_dataset("folder", _folder_dataset(tmp_path / "d", n=3))
    with pytest.raises(ValueError, match="do not fit"):
        train(ds, TrainConfig(n_train=2, n_val=1, epochs=1, width=0.125, init=str(w)), progress=False)


def test_packaged_model_names(capsys):
    vgg = fastcount.load_model("vgg")
    default = fastcount.load_model()
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(vgg.state_dict().values(), default.state_dict().values()))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vgg ") and "\nmbm " in out and "test MAE 2.47" in out
    with pytest.raises(ValueError, match="unknown packaged model"):
        fastcount.io.packaged_weights_path("hne")


def test_mbm_model_counts_slides_by_name(tmp_path, capsys):
    path = fastcount.io.packaged_weights_path("mbm")
    if not path.is_file():
        pytest.skip(f"this installation lacks the packaged MBM model ({path})")
    meta = read_metadata(path)
    assert meta["dataset"] == "mbm" and float(meta["test_mae"]) > 0 and meta["config"]["width"] == 0.5
    img = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    res = fastcount.count_slide(img, model="mbm", mask=None, tile=64, device="cpu", backend="eager", progress=False)
    model = fastcount.load_model("mbm")
    ref = fastcount.count_image(img, model, device="cpu")
    assert abs(res.total - ref) <= 1e-4 * max(1.0, abs(ref))
    Image.fromarray(img).save(tmp_path / "im.png")
    assert main(["count", str(tmp_path / "im.png"), "--weights", "mbm", "--mask", "none", "--backend", "eager",
                 "--tile", "64", "--device", "cpu", "--quiet", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["total"] - ref) <= 1e-4 * max(1.0, abs(ref))


@pytest.mark.slow
def test_mbm_model_test_mae_matches_its_record():
    """The test MAE the metadata and docs/accuracy.md record, on the 11 held-out (halved) MBM images."""
    from conftest import DATASETS

    path = fastcount.io.packaged_weights_path("mbm")
    if not path.is_file():
        pytest.skip(f"this installation lacks the packaged MBM model ({path})")
    model = fastcount.load_model("mbm")
    ds = load_dataset("mbm", DATASETS, halve=True)
    assert json.loads(read_metadata(path)["split"])["test"] == ds.names[-11:]
    errs = [abs(fastcount.count_image(ds[i][0], model, device="cpu") - float(ds[i][1].sum())) for i in range(33, 44)]
    assert abs(float(np.mean(errs)) - float(model.metadata["test_mae"])) < 0.05, errs


def test_import_fastcount_gives_data_lazily():
    code = ("import sys, fastcount; assert 'fastcount.data' not in sys.modules; "
            "assert callable(fastcount.data.load_dataset) and 'fastcount.data' in sys.modules; "
            "assert fastcount.data.synth.cell_image")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastcount.nope
