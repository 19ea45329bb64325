"""Every ``fastcount`` command and option, run through ``main`` and checked by its effect.

Commands run in-process (``fastcount.cli.main``) to skip a torch import per call; the
training commands use a miniature MBM-layout folder (crops of real MBM images) so a run
takes about a second.
"""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastcount
import fastcount.io
from fastcount import CountCeption, count_slide, load_model
from fastcount.cli import _dataset, build_parser, main
from fastcount.io import read_metadata, save_model

from conftest import DATASETS, SLIDES, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model():
    return randomize_bn(CountCeption(width=0.0625), seed=1).eval()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("w") / "w.safetensors")


@pytest.fixture(scope="module")
def mini_mbm(tmp_path_factory):
    """16 image/dot pairs in the MBM layout, 64x64 crops (32x32 after the protocol's halving)."""
    src = DATASETS / "mbm"
    folder = tmp_path_factory.mktemp("mini_mbm")
    names = sorted(p.name for p in src.glob("*.png") if "_dots_" not in p.name)[:16]
    for name in names:
        base, idx = name.rsplit("_", 1)
        for n in (name, f"{base}_dots_{idx}"):
            with Image.open(src / n) as im:
                im.crop((200, 200, 264, 264)).save(folder / n)
    return folder


@pytest.fixture
def no_default_weights(monkeypatch, tmp_path):
    """As if the packaged weights were not installed (the real file is left alone)."""
    missing = tmp_path / "not_installed" / "default.safetensors"
    monkeypatch.setattr(fastcount.io, "default_weights_path", lambda: missing)
    return missing


def _train_args(root, out, *extra):
    return ["train", "--dataset", "mbm", "--data-root", root, "--n-train", 2, "--n-val", 1, "--epochs", 1,
            "--width", 0.0625, "--batch-size", 1, "--device", "cpu", "--quiet", "--bf16-calibrate", 0,
            "--bn-recal", 2, "--out", out, *extra]


def _state(path):
    return load_model(path).state_dict()


def _same_weights(a, b):
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- version, info, no weights


def test_version_prints_the_package_version():
    r = subprocess.run([sys.executable, "-m", "fastcount", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"fastcount {fastcount.__version__}"


def test_info_reports_versions_ops_and_weights(capsys, no_default_weights, monkeypatch):
    from fastcount.ops import has_compiled_ops

    code, out, _ = run(capsys, "info")
    assert code == 0 and f"fastcount {fastcount.__version__}, torch {torch.__version__}" in out
    assert f"CUDA available: {torch.cuda.is_available()}" in out
    assert ("compiled ops: yes" in out) == has_compiled_ops()
    assert "default weights: not installed" in out
    monkeypatch.undo()
    code, out, _ = run(capsys, "info")
    installed = fastcount.io.default_weights_path()
    assert f"default weights: {installed if installed.is_file() else 'not installed'}" in out


def test_no_weights_installed_is_a_clear_error(capsys, no_default_weights):
    with pytest.raises(FileNotFoundError, match="no packaged default weights") as e:
        load_model(None)
    assert str(no_default_weights) in str(e.value) and "fastcount train" in str(e.value)
    code, _, err = run(capsys, "count", SLIDES / "boxes.png", "--quiet", "--mask", "none")
    assert code == 2 and "no packaged default weights" in err
    code, _, err = run(capsys, "demo", "--size", 256, "--quiet")
    assert code == 2 and "no default weights are installed" in err and "--untrained" in err


# --------------------------------------------------------------------------- demo


def test_demo_untrained_out_seed_heatmap(capsys, no_default_weights, tmp_path):
    from fastcount.data.synth import write_synthetic_slide

    truths = {}
    for seed in (3, 4):
        heat = tmp_path / f"heat{seed}.png"
        code, out, err = run(capsys, "demo", "--untrained", "--size", 256, "--width", 0.0625, "--tile", 128,
                             "--seed", seed, "--tissue-fraction", 0.3, "--out", tmp_path / "keep", "--backend", "eager",
                             "--heatmap", heat, "--quiet")
        assert code == 0, err
        kept = tmp_path / "keep" / f"synthetic_256_seed{seed}.tif"
        assert "UNTRAINED" in out and f"kept at {kept}" in out and kept.is_file()
        ref = write_synthetic_slide(tmp_path / f"ref{seed}.tif", 256, seed=seed, tissue_fraction=0.3)
        assert re.search(rf"ground truth +{ref['total']} ", out)
        truths[seed] = ref["total"]
        # the demo's random model is CountCeption(width) seeded with --seed
        torch.manual_seed(seed)
        m = CountCeption(width=0.0625).eval()
        res = count_slide(kept, m, tile=128, progress=False, backend="eager")
        assert f"count        {res.total:10.1f}" in out
        with Image.open(heat) as im:
            assert im.size[0] > 0 and im.format == "PNG"
    assert truths[3] != truths[4]  # --seed picks another synthetic slide


def test_demo_weights_option(capsys, model, weights, tmp_path):
    code, out, err = run(capsys, "demo", "--weights", weights, "--size", 256, "--tile", 128, "--seed", 3,
                         "--tissue-fraction", 0.3, "--out", tmp_path, "--heatmap", tmp_path / "h.png",
                         "--backend", "eager", "--quiet")
    assert code == 0, err
    res = count_slide(tmp_path / "synthetic_256_seed3.tif", model, tile=128, progress=False, backend="eager")
    assert f"count        {res.total:10.1f}\n" in out and "UNTRAINED" not in out


# --------------------------------------------------------------------------- count


def _count(capsys, weights, path, *extra):
    code, out, err = run(capsys, "count", path, "--weights", weights, "--mask", "none", "--quiet", "--json",
                         "--backend", "eager", "--tile", 128, *extra)
    assert code == 0, err
    return json.loads(out)


def test_count_level_and_mpp(capsys, model, weights):
    r = _count(capsys, weights, SLIDES / "boxes.tiff", "--level", 1)
    ref = count_slide(SLIDES / "boxes.tiff", model, level=1, tile=128, mask=None, progress=False, backend="eager")
    assert r["level"] == 1 and r["shape"] == [125, 150] and r["total"] == pytest.approx(ref.total, rel=1e-6)
    # boxes.tiff: 352.8 um/px at level 0, levels at 2x and 4x; 1400 um/px is closest to level 2
    assert r["mpp"] == pytest.approx(352.78, rel=1e-4)
    r = _count(capsys, weights, SLIDES / "boxes.tiff", "--mpp", 1400)
    assert r["level"] == 2 and r["shape"] == [62, 75]
    code, _, err = run(capsys, "count", SLIDES / "boxes.png", "--weights", weights, "--mpp", 0.5, "--quiet")
    assert code == 2 and "does not record its microns per pixel" in err


def test_count_checkpoint_resumes_to_the_same_total(capsys, weights, tmp_path):
    ck = tmp_path / "boxes.ckpt.npz"
    first = _count(capsys, weights, SLIDES / "boxes.png", "--checkpoint", ck)
    assert ck.is_file() and first["stats"]["tiles_resumed"] == 0
    again = _count(capsys, weights, SLIDES / "boxes.png", "--checkpoint", ck)
    assert again["stats"]["tiles_resumed"] == again["stats"]["tiles_total"] > 1
    assert again["total"] == first["total"]


def test_count_batch_size_workers_tile_backend_precision_device(capsys, weights):
    base = _count(capsys, weights, SLIDES / "boxes.png")
    workers = base["stats"]["workers"] + 1  # not the default
    r = _count(capsys, weights, SLIDES / "boxes.png", "--batch-size", 3, "--workers", workers)
    assert (r["stats"]["batch_size"], r["stats"]["workers"]) == (3, workers)
    assert base["stats"]["batch_size"] != 3 and r["stats"]["batches"] < base["stats"]["batches"]
    assert r["total"] == pytest.approx(base["total"], rel=1e-5)
    r = _count(capsys, weights, SLIDES / "boxes.png", "--tile", 64)
    assert r["stats"]["tile"] == 64 and r["stats"]["tiles_total"] > base["stats"]["tiles_total"]
    assert r["total"] == pytest.approx(base["total"], rel=1e-5)
    r = _count(capsys, weights, SLIDES / "boxes.png", "--backend", "cpu", "--precision", "bf16", "--device", "cpu")
    assert r["stats"]["precision"] == "bf16" and r["stats"]["device"] == "cpu"
    assert r["stats"]["backend"] != base["stats"]["backend"]
    assert r["total"] != base["total"] and r["total"] == pytest.approx(base["total"], rel=0.05)
    code, _, err = run(capsys, "count", SLIDES / "boxes.png", "--weights", weights, "--device", "nonsense", "--quiet")
    assert code == 2 and "device must be 'auto', 'cpu', 'cuda'" in err  # --device reaches count_slide


def test_count_text_heatmap_geojson_mask_quiet(capsys, model, weights, tmp_path):
    code, out, err = run(capsys, "count", SLIDES / "boxes.tiff", "--weights", weights, "--tile", 128,
                         "--backend", "eager", "--heatmap", tmp_path / "h.png", "--geojson", tmp_path / "g.geojson")
    assert code == 0, err
    ref = count_slide(SLIDES / "boxes.tiff", model, tile=128, progress=False, backend="eager")  # mask "auto"
    assert ref.stats["mask"]["kind"] not in (None, "none")
    assert out.startswith(f"{SLIDES / 'boxes.tiff'}: {ref.total:.1f} objects (300x250 px at level 0;")
    assert "it/s" in err or "tile" in err  # a progress bar without --quiet
    with Image.open(tmp_path / "h.png") as im:
        assert im.format == "PNG" and min(im.size) > 1
    assert json.loads((tmp_path / "g.geojson").read_text()) == json.loads(json.dumps(ref.to_geojson()))
    _, _, err = run(capsys, "count", SLIDES / "boxes.png", "--weights", weights, "--quiet", "--tile", 128,
                    "--backend", "eager")
    assert err == ""


def test_count_weights_option_changes_the_model(capsys, weights, tmp_path):
    other = save_model(randomize_bn(CountCeption(width=0.0625), seed=7).eval(), tmp_path / "other.safetensors")
    a = _count(capsys, weights, SLIDES / "boxes.png")
    b = _count(capsys, other, SLIDES / "boxes.png")
    assert a["total"] != b["total"]


# --------------------------------------------------------------------------- train


def test_train_options_reach_the_model_and_its_record(capsys, mini_mbm, tmp_path):
    from fastcount.train import _load_checkpoint

    out = tmp_path / "w.safetensors"
    code, text, err = run(capsys, *_train_args(mini_mbm, out, "--epochs", 2, "--seed", 5, "--stride", 2,
                                                "--no-augment", "--lr", 1e-3, "--lr-schedule", "constant",
                                                "--crop", 24, "--fft", "--n-train", 3, "--n-val", 2))
    assert code == 0, err
    assert "training on 3, validating on 2, test = last 11" in text and "on 11 images" in text
    m = load_model(out)
    assert m.stride == 2 and m.config["width"] == 0.0625 and m.bf16_rounding is None  # --bf16-calibrate 0
    meta = read_metadata(out)
    cfg = json.loads(meta["train_config"])
    assert {k: cfg[k] for k in ("n_train", "n_val", "epochs", "crop", "width", "batch_size", "lr", "seed",
                                "stride", "augment", "lr_schedule", "bn_recal", "fft", "device")} == {
        "n_train": 3, "n_val": 2, "epochs": 2, "crop": 24, "width": 0.0625, "batch_size": 1, "lr": 1e-3,
        "seed": 5, "stride": 2, "augment": False, "lr_schedule": "constant", "bn_recal": 2, "fft": True,
        "device": "cpu"}
    assert len(json.loads(meta["train_images"])) == 3
    *_, ck = _load_checkpoint(out.with_name(out.name + ".ckpt"))
    assert [h["lr"] for h in ck["history"]] == [1e-3, 1e-3]  # constant schedule
    assert "bf16 rounding calibrated" not in text


def test_train_seed_resume_and_progress(capsys, mini_mbm, tmp_path):
    a, b, c, d = (tmp_path / f"{n}.safetensors" for n in "abcd")
    for out in (a, b):
        code, text, err = run(capsys, *_train_args(mini_mbm, out, "--seed", 1))
        assert code == 0 and "resumed" not in text, err
    assert _same_weights(a, b)  # same --seed, same model
    code, _, err = run(capsys, *_train_args(mini_mbm, c, "--seed", 2))
    assert code == 0, err
    assert not _same_weights(a, c)
    # --resume continues b's run to 2 epochs; it matches a straight 2-epoch run (d), with a progress bar
    code, text, err = run(capsys, *_train_args(mini_mbm, b, "--seed", 1, "--epochs", 2, "--resume"))
    assert code == 0 and "resumed from" in text + err and "epoch 2/2" in text + err
    argv = _train_args(mini_mbm, d, "--seed", 1, "--epochs", 2)
    argv.remove("--quiet")
    code, text, err = run(capsys, *argv)
    assert code == 0 and "step" in err  # the tqdm bar
    assert _same_weights(b, d)


def test_data_options_red_threshold_and_no_halve(mini_mbm, tmp_path):
    ap = build_parser()
    argv = ["train", "--dataset", "mbm", "--data-root", str(mini_mbm), "--out", "x"]
    halved = _dataset(ap.parse_args(argv))
    full = _dataset(ap.parse_args(argv + ["--no-halve"]))
    assert halved[0][0].shape == (32, 32, 3) and full[0][0].shape == (64, 64, 3)
    assert halved.counts.sum() == full.counts.sum() > 0  # halving keeps every dot
    # one pure red dot and one pinkish one (R - max(G, B) = 150)
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "a.png")
    dots = np.zeros((40, 40, 3), np.uint8)
    dots[5, 5] = (255, 0, 0)
    dots[20, 30] = (200, 50, 50)
    Image.fromarray(dots).save(tmp_path / "a_dots.png")
    argv = ["train", "--dataset", "folder", "--data-root", str(tmp_path), "--out", "x"]
    assert _dataset(ap.parse_args(argv)).counts.tolist() == [2]  # default threshold 100
    assert _dataset(ap.parse_args(argv + ["--red-threshold", "200"])).counts.tolist() == [1]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_splits_prints_mean_and_std(capsys, mini_mbm):
    code, out, err = run(capsys, "evaluate", "--dataset", "mbm", "--data-root", mini_mbm, "--splits", 2,
                         "--n-train", 2, "--n-val", 1, "--epochs", 1, "--width", 0.0625, "--batch-size", 1,
                         "--bn-recal", 2, "--device", "cpu", "--quiet", "--seed", 4)
    assert code == 0, err
    tests = [float(t) for t in re.findall(r"split \d/2 \(seed [45]\): val MAE [\d.]+, test MAE ([\d.]+)", out)]
    assert len(tests) == 2, out
    m = re.search(r"mbm N=2: test MAE ([\d.]+) \+- ([\d.]+) over 2 splits", out)
    assert m and float(m.group(1)) == pytest.approx(np.mean(tests), abs=0.006)
    assert float(m.group(2)) == pytest.approx(np.std(tests, ddof=1), abs=0.006)


def test_evaluate_weights_on_the_test_set(capsys, mini_mbm, weights):
    from fastcount.train import evaluate

    ds = _dataset(build_parser().parse_args(["evaluate", "--dataset", "mbm", "--data-root", str(mini_mbm)]))
    code, out, err = run(capsys, "evaluate", "--dataset", "mbm", "--data-root", mini_mbm, "--weights", weights,
                         "--device", "cpu")
    assert code == 0, err
    ref = evaluate(load_model(weights), ds, list(range(5, 16)))
    assert f"mbm: test MAE {ref['mae']:.3f}, RMSE {ref['rmse']:.3f}, on 11 images" in out


def test_train_bf16_calibrate_rejects_negatives(capsys, mini_mbm, tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args([str(a) for a in _train_args(mini_mbm, tmp_path / "w.safetensors",
                                                               "--bf16-calibrate", "-1")])
    assert "--bf16-calibrate" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_bad_device_is_a_clear_error(capsys, mini_mbm, tmp_path, command):
    argv = [command, "--dataset", "mbm", "--data-root", mini_mbm, "--n-train", 2, "--n-val", 1, "--epochs", 1,
            "--width", 0.0625, "--quiet"]
    argv += ["--out", tmp_path / "w.safetensors"] if command == "train" else []
    code, _, err = run(capsys, *argv, "--device", "nonsense")
    assert code == 2 and "device must be 'auto', 'cpu', 'cuda'" in err and "nonsense" in err
    assert not (tmp_path / "w.safetensors").exists()
    if torch.cuda.is_available():
        pytest.skip("--device cuda works on this machine (the no-CUDA error needs a machine without one)")
    code, _, err = run(capsys, *argv, "--device", "cuda")
    assert code == 2 and "CUDA is not available on this machine" in err


def test_cli_entry_point_train_plot_bf16_and_evaluate(mini_mbm, tmp_path):
    """`python -m fastcount` end to end: train with --plot and the bf16 calibration, then evaluate."""
    import os

    from fastcount.inference import fold

    env = dict(os.environ, OMP_NUM_THREADS="1")  # the shared 2-core CI machine: no thread spin-waits
    out = tmp_path / "cli.safetensors"
    argv = [str(a) for a in _train_args(mini_mbm, out, "--epochs", 2, "--bf16-calibrate", 2, "--plot",
                                        tmp_path / "c.png")]
    r = subprocess.run([sys.executable, "-m", "fastcount", *argv], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout + r.stderr and "test MAE" in r.stdout
    assert "bf16 rounding calibrated on 2 training images" in r.stdout
    trained = load_model(out)
    trained.bf16_rounding.check(fold(trained, torch.float64))  # stored with the weights, matching them
    with Image.open(tmp_path / "c.png") as im:  # a real picture, not an empty file
        assert im.size[0] > 400 and len(np.unique(np.asarray(im.convert("L")))) > 10
    r = subprocess.run([sys.executable, "-m", "fastcount", "evaluate", "--dataset", "mbm", "--data-root", str(mini_mbm),
                        "--weights", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "mbm: test MAE" in r.stdout and "on 11 images" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastcount", "train", "--dataset", "vgg_cells", "--data-root",
                        str(tmp_path / "nowhere"), "--out", str(out)], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 2 and "dataset folder not found" in r.stderr and "Traceback" not in r.stderr
