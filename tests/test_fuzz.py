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
