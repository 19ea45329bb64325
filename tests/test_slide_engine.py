"""count_slide engine: masks, skipped tiles never read, checkpoint/resume, exports, bounded memory, CLI."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import SLIDES, randomize_bn
from fastcount import CountCeption, count_slide, save_model
from fastcount.data.synth import write_synthetic_slide
from fastcount.slide import SlideReader, auto_mask, open_reader


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(CountCeption(width=0.0625), seed=1).eval()


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "s.tif"
    return write_synthetic_slide(path, 1024, seed=1, tissue_fraction=0.08, n_regions=1)


class CountingReader(SlideReader):
    """Wraps a reader and records every region read."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.level_shapes = inner.level_shapes
        self.mpp = inner.mpp
        self.reads = []

    @property
    def downsamples(self):
        return self.inner.downsamples

    def _read(self, level, y, x, h, w):
        self.reads.append((level, y, x, h, w))
        return self.inner.read_region(level, y, x, h, w)


# --------------------------------------------------------------------------- masks


def test_auto_mask_fluorescence_and_brightfield():
    rng = np.random.default_rng(0)
    fl = np.clip(rng.normal(3, 1, (100, 120, 3)), 0, 255)
    fl[20:50, 30:70, 2] += 120  # bright blue nuclei region on black
    m, info = auto_mask(fl.astype(np.uint8), dilate=0)
    assert info["kind"] == "fluorescence"
    assert m[25:45, 35:65].all() and not m[70:, :].any()
    bf = np.clip(rng.normal(240, 3, (100, 120, 3)), 0, 255)
    bf[60:90, 10:50] = np.clip(rng.normal((200, 120, 180), 10, (30, 40, 3)), 0, 255)  # pink tissue on white
    m, info = auto_mask(bf.astype(np.uint8), dilate=0)
    assert info["kind"] == "brightfield"
    assert m[62:88, 12:48].all() and not m[:50].any()
    m, info = auto_mask(np.full((30, 30, 3), 128, np.uint8))
    assert m.all() and info["threshold"] is None


def test_masked_tiles_are_never_read_at_full_resolution(model, synth_slide):
    r = CountingReader(open_reader(synth_slide["path"]))
    res = count_slide(r, model, tile=128, progress=False, backend="eager")
    st = res.stats
    assert st["tiles_skipped"] > 0.5 * st["tiles_total"]
    assert st["tiles_processed"] + st["tiles_skipped"] == st["tiles_total"]
    level0 = [x for x in r.reads if x[0] == 0]
    assert len(level0) == st["tiles_processed"]  # the mask came from a lower level
    assert st["mask"]["kind"] == "fluorescence" and 0 < st["mask"]["fraction"] < 0.5
    r.inner.close()


def test_user_mask_any_resolution_and_wrong_shape(model):
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    none = count_slide(img, model, tile=32, mask=None, progress=False, backend="eager")
    allm = count_slide(img, model, tile=32, mask=np.ones((2, 3), bool), progress=False, backend="eager")
    assert allm.total == none.total and allm.stats["tiles_skipped"] == 0
    zero = count_slide(img, model, tile=32, mask=np.zeros((64, 96), bool), progress=False, backend="eager")
    assert zero.total == 0 and zero.stats["tiles_processed"] == 0
    half = np.zeros((8, 12), bool)
    half[:, :3] = True  # left quarter only
    part = count_slide(img, model, tile=32, mask=half, progress=False, backend="eager")
    assert 0 < part.stats["tiles_processed"] < none.stats["tiles_processed"]
    for bad, err in [(np.ones((64, 64), bool), ValueError), (np.ones((4, 4, 3), bool), ValueError),
                     (np.full((64, 96), 0.5), TypeError), ("tissue", ValueError), (3, TypeError)]:
        with pytest.raises(err, match="mask"):
            count_slide(img, model, tile=32, mask=bad, progress=False, backend="eager")


# --------------------------------------------------------------------------- checkpoint / interrupt


class InterruptingReader(CountingReader):
    def __init__(self, inner, after):
        super().__init__(inner)
        self.after = after

    def _read(self, level, y, x, h, w):
        if level == 0 and len([r for r in self.reads if r[0] == 0]) >= self.after:
            raise KeyboardInterrupt
        return super()._read(level, y, x, h, w)


def test_interrupt_then_resume_gives_identical_total(model, tmp_path):
    img = np.random.default_rng(5).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    ref = count_slide(img, model, tile=32, mask=None, progress=False, backend="eager", batch_size=2)
    ck = tmp_path / "run.ckpt.npz"
    with pytest.raises(KeyboardInterrupt):
        count_slide(InterruptingReader(open_reader(img), after=9), model, tile=32, mask=None, progress=False, backend="eager",
                    batch_size=2, checkpoint=ck, workers=1, queue_depth=1)
    assert ck.exists() and not list(tmp_path.glob("*.tmp*"))
    with np.load(ck) as z:
        n_done, n_batches = int(z["done"].sum()), len(z["done"])
    assert 0 < n_done < n_batches
    r = CountingReader(open_reader(img))
    res = count_slide(r, model, tile=32, mask=None, progress=False, backend="eager", batch_size=2, checkpoint=ck)
    assert res.total == ref.total  # identical, not just close
    np.testing.assert_allclose(res.density, ref.density, rtol=1e-12, atol=1e-12)
    assert n_done <= res.stats["tiles_resumed"] <= 2 * n_done
    assert len(r.reads) == res.stats["tiles_processed"] == ref.stats["tiles_processed"] - res.stats["tiles_resumed"]
    # A checkpoint of another run is refused, naming what differs.
    with pytest.raises(ValueError, match="checkpoint .* different run .*tile"):
        count_slide(img, model, tile=48, mask=None, progress=False, backend="eager", batch_size=2, checkpoint=ck)


def test_reader_error_mid_run_propagates_cleanly(model):
    class Broken(CountingReader):
        def _read(self, level, y, x, h, w):
            if len(self.reads) >= 3:
                raise OSError("disk on fire")
            return super()._read(level, y, x, h, w)

    img = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(ValueError, match="disk on fire"):
        count_slide(Broken(open_reader(img)), model, tile=32, mask=None, progress=False, backend="eager")


# --------------------------------------------------------------------------- mask correctness


def test_auto_mask_density_is_whole_image_on_kept_tiles_and_no_cell_is_skipped(model, synth_slide):
    from fastcount import redundant_count
    from fastcount.data.synth import REACH
    from fastcount.slide import plan_tiles

    r = CountingReader(open_reader(synth_slide["path"]))
    res = count_slide(r, model, tile=128, progress=False, backend="eager")
    read = {(y, x, h, w) for lv, y, x, h, w in r.reads if lv == 0}
    r.inner.close()
    plan = plan_tiles(1024, 1024, 128, model.geometry)
    kept = [t for t in plan.tiles if (t.iy0, t.ix0, t.iy1 - t.iy0, t.ix1 - t.ix0) in read]
    assert len(kept) == res.stats["tiles_processed"] and res.stats["tiles_skipped"] > 0
    # No true cell lies in a skipped tile's input box, nor close enough for its signal to reach it.
    dots = synth_slide["slide"].dots()
    m = math.ceil(REACH)
    for t in plan.tiles:
        if t not in kept:
            assert dots[max(t.iy0 - m, 0) : t.iy1 + m, max(t.ix0 - m, 0) : t.ix1 + m].sum() == 0, t
    # Kept blocks hold the whole-image density, every other block exactly 0.
    with torch.inference_mode():
        img = open_reader(synth_slide["path"]).read_region(0, 0, 0, 1024, 1024)
        cm = model(torch.from_numpy(img).permute(2, 0, 1)[None].float())[0, 0].double()
    keep = torch.zeros_like(cm, dtype=torch.bool)
    for t in kept:
        keep[t.gy0 : t.gy0 + t.cy1 - t.cy0, t.gx0 : t.gx0 + t.cx1 - t.cx0] = True
    scale = float(cm.abs().sum()) / 1024
    np.testing.assert_allclose(res.density, redundant_count(cm * keep, cell=res.cell).numpy(), rtol=0,
                               atol=1e-5 * scale)
    outside = redundant_count(keep.double(), cell=res.cell).numpy() == 0
    assert outside.any() and (res.density[outside] == 0).all()
    assert abs(res.total - float((cm * keep).sum()) / 1024) <= 1e-5 * scale


# --------------------------------------------------------------------------- checkpoint: kill -9, corrupt files


def _child_count(weights, source, ck, **kw):
    """A script counting ``source`` with a checkpoint after every batch; reads slowed to 30 ms so
    the run is still going when the test kills it."""
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return (
        "import time, torch, fastcount; import fastcount.slide.prefetch as E; torch.set_num_threads(1); "
        "_rb = E._read_batch; E._read_batch = lambda *a, **k: (time.sleep(0.03), _rb(*a, **k))[1]; "
        f"m = fastcount.load_model({str(weights)!r}); "
        f"fastcount.count_slide({str(source)!r}, m, progress=False, workers=1, checkpoint={str(ck)!r}, "
        f"checkpoint_every=0, {args})"
    )


def _batches_done(ck) -> int:
    """Finished batches in a checkpoint (0 while there is none yet; saves are atomic renames)."""
    if not ck.exists():
        return 0
    with np.load(ck) as z:
        return int(z["done"].sum())


def test_sigkill_after_first_checkpoint_resumes_to_identical_total(model, synth_slide, tmp_path):
    """kill -9 gives the process no chance to clean up: the last atomic save must be enough."""
    import signal
    import time

    kw = dict(tile=128, mask="auto", backend="eager")
    w = save_model(model, tmp_path / "w.safetensors")
    ck = tmp_path / "ck.npz"
    p = subprocess.Popen([sys.executable, "-c", _child_count(w, synth_slide["path"], ck, **kw)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while _batches_done(ck) == 0 and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, f"the counting process ended before it could be killed: {p.communicate()[1]}"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    with np.load(ck) as z:
        assert 0 < z["done"].sum() < len(z["done"])
    ref = count_slide(synth_slide["path"], model, progress=False, **kw)
    res = count_slide(synth_slide["path"], model, progress=False, checkpoint=ck, **kw)
    assert res.stats["tiles_resumed"] > 0 and res.stats["tiles_skipped"] == ref.stats["tiles_skipped"] > 0
    assert res.total == ref.total  # identical, not just close
    np.testing.assert_allclose(res.density, ref.density, rtol=1e-12, atol=1e-12)


def _damaged(good: bytes, damage: str) -> bytes:
    if damage == "foreign":  # an npz with the right keys written by something else
        import io

        buf, z = io.BytesIO(), np.zeros(3)
        np.savez(buf, fingerprint=np.array("not json"), done=z, sums=z, density=z)
        return buf.getvalue()
    return {"garbage": b"this is not a checkpoint" * 40, "empty": b"", "truncated": good[: len(good) // 2],
            "cut short": good[:-20], "flipped": good[:100] + bytes(b ^ 0xFF for b in good[100:400]) + good[400:]}[damage]


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "cut short", "flipped", "foreign"])
def test_damaged_checkpoint_is_refused_and_left_alone(model, tmp_path, damage):
    img = np.random.default_rng(6).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    ck = tmp_path / "run.npz"
    kw = dict(tile=32, mask=None, progress=False, backend="eager")
    with pytest.raises(KeyboardInterrupt):
        count_slide(InterruptingReader(open_reader(img), after=2), model, checkpoint=ck, workers=1, queue_depth=1,
                    **kw)
    bad = _damaged(ck.read_bytes(), damage)
    ck.write_bytes(bad)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(ck))} is not a readable fastcount checkpoint"):
        count_slide(img, model, checkpoint=ck, **kw)
    assert ck.read_bytes() == bad  # never silently overwritten


# --------------------------------------------------------------------------- exports


def test_exports(model, synth_slide, tmp_path):
    res = count_slide(synth_slide["path"], model, tile=256, progress=False, backend="eager")
    png = res.save_heatmap(tmp_path / "h.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > im.size[1] and im.mode == "RGB"  # thumbnail plus colour bar on the right
    gj = res.to_geojson(tmp_path / "d.geojson")
    on_disk = json.loads((tmp_path / "d.geojson").read_text())
    assert on_disk == gj and gj["type"] == "FeatureCollection"
    total = sum(f["properties"]["measurements"]["Count"] for f in gj["features"])
    inside = res.density.sum() - sum(res.density[i, j] for i, j in np.argwhere(res.density <= 0))
    assert total == pytest.approx(inside, rel=1e-9, abs=1e-6)
    f0 = gj["features"][0]
    assert f0["geometry"]["type"] == "Polygon" and len(f0["geometry"]["coordinates"][0]) == 5
    xs = [p[0] for f in gj["features"] for p in f["geometry"]["coordinates"][0]]
    assert min(xs) >= 0 and max(xs) <= 1024
    d = json.loads(res.to_json())
    assert d["total"] == res.total and np.asarray(d["density"]).shape == res.density.shape
    for k in ("tiles_processed", "tiles_skipped", "seconds", "megapixels_per_s", "peak_rss_mb"):
        assert k in d["stats"]
    assert res.density.sum() == pytest.approx(res.total, rel=1e-12)


# --------------------------------------------------------------------------- bounded memory


def test_large_slide_bounded_memory_background_skipped(model, tmp_path):
    """A 16384^2 pyramidal slide (805 MB of pixels per level 0) counts in bounded memory."""
    info = write_synthetic_slide(tmp_path / "big.tif", 16384, seed=3, tissue_fraction=0.0005, n_regions=1,
                                 background_noise=0.0, tile=512)
    from fastcount.system import peak_rss_mb, reset_peak_rss

    reset_peak_rss()
    before = peak_rss_mb()
    res = count_slide(info["path"], model, tile=512, progress=False, backend="eager")
    st = res.stats
    assert st["tiles_skipped"] >= 0.97 * st["tiles_total"], st
    assert st["tiles_processed"] >= 1
    grown = st["peak_rss_mb"] - before
    # Tile inputs are ~0.9 MB each; the level alone would be 805 MB.
    assert grown < 250, f"peak RSS grew by {grown:.0f} MiB"
    print(f"\n16384^2 slide: {st['tiles_processed']}/{st['tiles_total']} tiles, {st['seconds']:.1f}s, "
          f"peak RSS {st['peak_rss_mb']:.0f} MiB (+{grown:.0f})")


# --------------------------------------------------------------------------- CLI


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastcount", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_count_slide_and_image(model, tmp_path):
    w = save_model(model, tmp_path / "w.safetensors")
    r = _cli("count", SLIDES / "boxes.tiff", "--weights", w, "--tile", 64, "--json", "--quiet", "--mask", "none",
             "--backend", "eager",
             "--heatmap", tmp_path / "h.png", "--geojson", tmp_path / "g.geojson")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ref = count_slide(SLIDES / "boxes.png", model, tile=64, mask=None, progress=False, backend="eager")
    assert out["total"] == pytest.approx(ref.total, rel=1e-6)
    assert (tmp_path / "h.png").is_file() and (tmp_path / "g.geojson").is_file()
    from PIL import Image

    m = np.zeros((25, 30), np.uint8)
    m[:, :10] = 255  # count the left third only
    Image.fromarray(m).save(tmp_path / "mask.png")
    r = _cli("count", SLIDES / "boxes.png", "--weights", w, "--tile", 64, "--quiet", "--backend", "eager",
             "--mask", tmp_path / "mask.png")
    assert r.returncode == 0 and "skipped as background" in r.stdout, r.stderr
    ref = count_slide(SLIDES / "boxes.png", model, tile=64, mask=m > 0, progress=False, backend="eager")
    assert f"{ref.total:.1f} objects" in r.stdout and ref.stats["tiles_skipped"] > 0
    r = _cli("count", SLIDES / "boxes.png", "--weights", w, "--quiet", "--mask", tmp_path / "nomask.png")
    assert r.returncode == 2 and "--mask" in r.stderr
    r = _cli("count", SLIDES / "unopenable.tiff", "--weights", w, "--quiet")
    assert r.returncode == 2 and "unopenable.tiff" in r.stderr and "Traceback" not in r.stderr
    r = _cli("count", SLIDES / "boxes.tiff", "--weights", w, "--tile", 4, "--quiet")
    assert r.returncode == 2 and "tile must be >=" in r.stderr


def test_cli_demo(tmp_path):
    r = _cli("demo", "--size", 256, "--quiet", cwd=tmp_path)
    from fastcount.io import default_weights_path

    installed = default_weights_path().is_file()  # tests/test_cli.py covers both cases by monkeypatching
    if installed:
        assert r.returncode == 0 and "ground truth" in r.stdout and "UNTRAINED" not in r.stdout, r.stderr
    else:
        assert r.returncode == 2 and "no default weights" in r.stderr and "--untrained" in r.stderr
    r = _cli("demo", "--size", 384, "--untrained", "--width", 0.0625, "--tile", 128, "--quiet",
             "--heatmap", tmp_path / "demo.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ground truth" in r.stdout and "Mpx/s" in r.stdout and "peak memory" in r.stdout
    assert ("UNTRAINED" in r.stdout) == (not installed)  # --untrained only when no weights are installed
    assert (tmp_path / "demo.png").is_file()


def test_real_ctrl_c_leaves_a_valid_checkpoint(model, tmp_path):
    """SIGINT to a running process: the checkpoint on disk stays loadable and resumes exactly."""
    import signal
    import time

    img = np.random.default_rng(8).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    w = save_model(model, tmp_path / "w.safetensors")
    ck = tmp_path / "ck.npz"
    # Each batch read is slowed to 20 ms in the child, so the run is still going when the
    # signal comes (a fast machine finished the whole image before it, and exited 0).
    script = (
        "import signal, time, numpy as np, torch, fastcount; import fastcount.slide.prefetch as E; "
        # a parent started in the background may pass SIGINT down ignored: restore Ctrl-C
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "torch.set_num_threads(1); _rb = E._read_batch; "
        "E._read_batch = lambda *a, **k: (time.sleep(0.02), _rb(*a, **k))[1]; "
        f"m = fastcount.load_model({str(w)!r}); img = np.load({str(tmp_path / 'img.npy')!r}); "
        f"fastcount.count_slide(img, m, tile=16, mask=None, progress=False, backend='eager', workers=1, "
        f"checkpoint={str(ck)!r}, checkpoint_every=0)"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ck.exists() and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)
    assert p.poll() is None, "the counting process finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "KeyboardInterrupt" in err
    with np.load(ck) as z:
        assert 0 < z["done"].sum() < len(z["done"])
    ref = count_slide(img, model, tile=16, mask=None, progress=False, backend="eager")
    res = count_slide(img, model, tile=16, mask=None, progress=False, backend="eager", checkpoint=ck)
    assert res.stats["tiles_resumed"] > 0 and res.total == ref.total


def test_geojson_keeps_every_count_with_small_cells(model):
    img = np.random.default_rng(9).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    res = count_slide(img, model, tile=32, cell=3, mask=None, progress=False, backend="eager")
    gj = res.to_geojson(min_count=-np.inf)
    assert len(gj["features"]) == res.density.size
    assert sum(f["properties"]["measurements"]["Count"] for f in gj["features"]) == pytest.approx(res.total)
    for f in gj["features"]:
        (x0, y0), _, (x1, y1) = f["geometry"]["coordinates"][0][:3]
        assert 0 <= x0 < x1 <= 50 and 0 <= y0 < y1 <= 40
