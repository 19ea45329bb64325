"""Damaged slide files count or raise a named error: never a crash, never a hang.

A CI-sized run of ``benchmarks/fuzz_slides.py`` (the 1,000-case run is in benchmarks/RESULTS.md).
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fastcount.slide.readers import SlideReadError

pytest.importorskip("tifffile", reason="fuzzing the TIFF formats needs tifffile (pip install 'fastcount[slides]')")
pytest.importorskip("openslide", reason="fuzzing SVS/DICOM needs openslide (pip install 'fastcount[slides]')")

_spec = importlib.util.spec_from_file_location(
    "fuzz_slides", Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_slides.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


class _Res:
    def __init__(self, total):
        self.total, self.shape = total, (1, 1)


def test_classify_tells_named_errors_from_crashes():
    from fastcount import CountCeption, count_slide

    def raise_(e):
        raise e

    assert fuzz.classify(lambda: _Res(2.5)) == {"outcome": "counted", "total": 2.5, "shape": [1, 1]}
    assert fuzz.classify(lambda: raise_(SlideReadError("bad tile")))["outcome"] == "named"
    # a checked ValueError raised by fastcount itself is named ...
    assert fuzz.classify(lambda: count_slide(np.zeros((8, 8, 3)), CountCeption(width=0.0625), tile=3))["outcome"] == "named"
    # ... a ValueError escaping from numpy, or any other exception type, is a crash
    assert fuzz.classify(lambda: np.zeros(-1))["outcome"] == "crash"
    assert fuzz.classify(lambda: raise_(RuntimeError("decoder blew up")))["outcome"] == "crash"
    assert fuzz.classify(lambda: _Res(float("nan")))["outcome"] == "crash"


def test_mutations_damage_the_bytes():
    import random

    data = bytes(range(256)) * 4
    for kind in fuzz.MUTATIONS:
        out, what = fuzz.mutate(data, kind, random.Random(1))
        assert out != data and what
    assert len(fuzz.mutate(data, "truncate", random.Random(2))[0]) < len(data)
    assert fuzz.mutate(data, "none", random.Random(3))[0] == data


def test_fuzzed_slides_count_or_raise_named_errors():
    """64 cases over 8 formats: the undamaged files count (16 cases), then 48 mutants."""
    r = fuzz.run(64, seed=13, timeout=60)
    bad = [c for c in r["cases"] if c["outcome"] in ("crash", "hang")]
    assert not bad, bad
    first = r["cases"][: 2 * len(r["by_format"])]  # each format undamaged, without and with the tissue mask
    assert all(c["mutation"] == "none" and c["outcome"] == "counted" for c in first), first
    assert {c["mask"] for c in first} == {None, "auto"}
    assert r["summary"]["named"] > 0 and len(r["by_format"]) == 8
    assert all(c["mutation"] in fuzz.MUTATIONS for c in r["cases"][len(first):])


def test_worker_reports_hangs_and_signals(tmp_path):
    """The harness itself can fail a case: no answer in time is a hang, a dead worker a crash."""
    import signal

    from conftest import SLIDES

    w = fuzz.Worker(tmp_path / "w.log")
    assert w.ask(SLIDES / "boxes.png", timeout=0.001)["outcome"] == "hang" and not w.alive()
    w.close()
    w = fuzz.Worker(tmp_path / "w.log")
    w.p.send_signal(signal.SIGSEGV)
    r = w.ask(SLIDES / "boxes.png", timeout=60)
    assert r["outcome"] == "crash" and f"signal {int(signal.SIGSEGV)}" in r["error"]
    w.close()


def _tiled_tiff(path, **overwrite):
    """A 64x96 tiled RGB TIFF with some header fields overwritten (as a damaged header would)."""
    import tifffile

    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(32, 32), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as t:
        for name, value in overwrite.items():
            t.pages[0].tags[name].overwrite(value)
    return path


def test_tiff_claiming_more_tiles_than_it_holds_is_refused(tmp_path):
    """Found by the fuzzer: a damaged width made a 7 KB file a 4-gigapixel image of zeros
    (tifffile fills missing tiles), exhausting memory while planning its tiles."""
    from fastcount.slide.readers import TiffReader, open_reader

    path = _tiled_tiff(tmp_path / "wide.tif", ImageWidth=4_000_000_000)
    with pytest.raises(SlideReadError, match=r"damaged TIFF: a 64x4000000000 level needs 250000000 tiles/strips, "
                                             r"the file lists 6"):
        TiffReader(path)
    with pytest.raises(SlideReadError, match="damaged TIFF"):
        open_reader(path)
    assert TiffReader(_tiled_tiff(tmp_path / "ok.tif")).level_shapes == [(64, 96)]  # the intact file opens
    # OpenSlide opens such a file and reads the missing tiles as white: no fallback to it
    tall = _tiled_tiff(tmp_path / "tall.tif", ImageLength=9_000_000)
    with pytest.raises(SlideReadError, match="damaged TIFF: a 9000000x96 level") as e:
        open_reader(tall)
    assert "OpenSlide" not in str(e.value)


def test_openslide_tile_size_openslide_cannot_allocate_is_refused(tmp_path):
    """Found by the fuzzer: OpenSlide aborts the process (GLib cannot allocate a 238 GB tile
    buffer) on a damaged tile size; the reader refuses it first. In a child: an abort is a failure."""
    import subprocess
    import sys

    path = _tiled_tiff(tmp_path / "tall_tiles.tif", TileLength=1862271008)
    code = ("from fastcount.slide.readers import OpenSlideReader, SlideReadError\n"
            f"try:\n    OpenSlideReader({str(path)!r}).read_region(0, 0, 0, 16, 16)\n"
            "except SlideReadError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and "claims 1862271008x32 px tiles" in r.stdout
