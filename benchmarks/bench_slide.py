"""count_slide throughput and peak memory, full-width model, eager backend.

    python -m pytest benchmarks/bench_slide.py --benchmark-only -s \
        --benchmark-json=/tmp/bench_slide.json

Cases (each one round: a run is tens of seconds on a 2-core CPU):
- ``whole_1024``: the baseline, ``model(whole 1024^2 image)`` in one call.
- ``tiled_1024``: ``count_slide`` on the same array, every tile (``mask=None``):
  the cost of the halo and of tiling, and the memory saved.
- ``synthetic_2048``: a 2048^2 pyramidal synthetic slide (15% tissue), auto mask.
- ``background_16384``: a 16384^2 slide, 0.05% tissue: peak RSS stays at a few
  tiles although one level holds 805 MB of pixels.
``extra_info`` carries Mpx/s (image pixels counted per second), peak RSS (MiB,
this call) and tile counts.
"""
import numpy as np
import pytest
import torch

import fastcount
from fastcount.data.synth import cell_image, write_synthetic_slide
from fastcount.ops import redundant_count
from fastcount.system import peak_rss_mb, reset_peak_rss

TILE = 512


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastcount.CountCeption().eval()


@pytest.fixture(scope="module")
def image_1024():
    img, _ = cell_image(1024, seed=0)
    return img


def _record(benchmark, res=None, **extra):
    s = benchmark.stats.stats.median
    info = {"seconds": s, "threads": torch.get_num_threads()}
    if res is not None:
        st = res.stats
        info.update(total=res.total, megapixels_per_s=st["megapixels_per_s"],
                    slide_megapixels_per_s=st["slide_megapixels_per_s"], peak_rss_mb=st["peak_rss_mb"],
                    tiles_processed=st["tiles_processed"], tiles_skipped=st["tiles_skipped"], tile=st["tile"],
                    backend=st["backend"])
    info.update(extra)
    benchmark.extra_info.update(info)
    print("\n" + benchmark.name + ": " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in info.items()))


def test_whole_1024(benchmark, model, image_1024):
    x = torch.from_numpy(image_1024).permute(2, 0, 1)[None].float()
    out = {}

    def run():
        reset_peak_rss()
        with torch.inference_mode():
            out["total"] = float(redundant_count(model(x)).sum())
        out["rss"] = peak_rss_mb()

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    s = benchmark.stats.stats.median
    _record(benchmark, total=out["total"], megapixels_per_s=1024 * 1024 / s / 1e6, peak_rss_mb=out["rss"])


def test_tiled_1024(benchmark, model, image_1024):
    out = {}

    def run():
        out["res"] = fastcount.count_slide(image_1024, model, tile=TILE, mask=None, backend="eager",
                                           progress=False)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    _record(benchmark, out["res"])


def test_synthetic_2048(benchmark, model, tmp_path_factory):
    info = write_synthetic_slide(tmp_path_factory.mktemp("b") / "s2048.tif", 2048, seed=0, tissue_fraction=0.15)
    out = {}

    def run():
        out["res"] = fastcount.count_slide(info["path"], model, tile=TILE, backend="eager", progress=False)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    _record(benchmark, out["res"], ground_truth=info["total"])


def test_background_16384(benchmark, model, tmp_path_factory):
    info = write_synthetic_slide(tmp_path_factory.mktemp("b") / "s16384.tif", 16384, seed=3,
                                 tissue_fraction=0.0005, n_regions=1, background_noise=0.0, tile=512)
    out = {}

    def run():
        out["res"] = fastcount.count_slide(info["path"], model, tile=TILE, backend="eager", progress=False)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    _record(benchmark, out["res"], ground_truth=info["total"])
