"""count_slide's host memory is bounded by tile x batch x (queue depth + 2), not by slide size.

Each slide size is counted in its own process with ``mask=None`` (every tile is
read and computed), from a source generated lazily per region (no pixels held
in RAM). The peak RSS of the two runs may differ only by the growth of the
arrays the call returns (thumbnail, density grid) plus a few batches' worth of
tile buffers: a per-tile leak over 4x the tiles would exceed that many times.
"""
import json
import os
import subprocess
import sys

import pytest

from fastcount import CountCeption
from fastcount.slide import plan_tiles

# Allowed growth, in units of the tile buffers in flight (tile input x batch x (queue depth + 2)).
# Identical runs differ by < 0.1 MiB; keeping one tile input per tile would add
# (extra tiles) / (depth + 2) units: 38 in the small check, 38 in the large one.
MULTIPLE = 8

_CHILD = r"""
import json, sys
import numpy as np, torch
from fastcount import CountCeption, count_slide
from fastcount.slide import SlideReader

class Lazy(SlideReader):
    # Pixels generated per region on demand: the slide itself never sits in RAM.
    def __init__(self, n):
        self.name = "lazy"
        self.level_shapes = [(n, n)]

    def _read(self, level, y, x, h, w):
        return np.random.default_rng([y, x]).integers(0, 256, (h, w, 3), dtype=np.uint8)

n, tile, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
torch.manual_seed(0)
model = CountCeption(width=0.0625).eval()
res = count_slide(Lazy(n), model, tile=tile, mask=None, progress=False, backend=backend, device="cpu", workers=2)
st = res.stats
print(json.dumps({"peak": st["peak_rss_mb"], "scope": st["peak_rss_scope"], "tiles": st["tiles_processed"],
                  "total_tiles": st["tiles_total"], "batch": st["batch_size"], "depth": st["queue_depth"],
                  "returned": (res.thumbnail.nbytes + res.density.nbytes) / 2**20}))
"""


def _start(n, tile, backend):
    # A fixed mmap threshold: glibc then hands freed tile-sized buffers back to the OS at once, so RSS
    # follows what the engine holds rather than the allocator's cache (about +-3 MiB between runs without).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(n), str(tile), backend], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(p):
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def check_bounded(small, big, tile, backend):
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux: the per-call peak RSS mark is reset through /proc/self/clear_refs")
    # Both sizes at once: the runs are independent processes, and CI has two cores.
    procs = [_start(small, tile, backend), _start(big, tile, backend)]
    a, b = (_finish(p) for p in procs)
    for r in (a, b):
        assert r["scope"] == "this call"
        assert r["tiles"] == r["total_tiles"]  # mask=None: nothing skipped
    assert b["tiles"] >= 3.5 * a["tiles"]
    g = CountCeption(width=0.0625).geometry
    in_bytes = max(t.in_shape[0] * t.in_shape[1] * 3 for t in plan_tiles(big, big, tile, g).tiles)
    unit = in_bytes * b["batch"] * (b["depth"] + 2) / 2**20
    allowed = (b["returned"] - a["returned"]) + MULTIPLE * unit
    grown = b["peak"] - a["peak"]
    print(f"\n{small}^2 -> {big}^2, tile {tile}, {backend}: {a['tiles']} -> {b['tiles']} tiles, peak RSS "
          f"{a['peak']:.1f} -> {b['peak']:.1f} MiB (+{grown:.2f}, allowed {allowed:.2f}; unit {unit:.2f} MiB)")
    assert grown < allowed, f"peak RSS grew by {grown:.2f} MiB with slide size (allowed {allowed:.2f} MiB)"


# Sizes with n + 32 a multiple of the tile: both runs see the same tile shapes, so the backend's
# per-shape workspaces are the same and only what scales with the slide could differ.


def test_peak_memory_does_not_grow_with_slide_size():
    # eager: on 64-px tiles of the tiny model the cpu backend takes ~5x longer; the large test runs "auto".
    check_bounded(480, 992, 64, "eager")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_slide_size_large():
    check_bounded(4064, 8160, 512, "auto")


_DEFAULT_TILE_CHILD = r"""
import json
import numpy as np, torch
import fastcount
from fastcount.inference import memory
torch.set_num_threads(1)
img = np.random.default_rng(0).integers(0, 256, (992, 992, 3), dtype=np.uint8)
res = fastcount.count_slide(img, fastcount.load_model(), mask=None, backend="cpu", device="cpu", progress=False,
                            workers=2)
print(json.dumps({"peak": res.stats["peak_rss_mb"], "scope": res.stats["peak_rss_scope"], "tile": res.stats["tile"],
                  "tiles": res.stats["tiles_processed"], "idle": memory.stats()["idle_bytes"],
                  "pool": memory.available()}))
"""
# The bound the default CPU tile is chosen for (benchmarks/RESULTS.md): default weights, cpu backend.
# Measured 1.0 GiB on this 992^2 image (4 full 512-pixel tiles), of which ~0.4 GiB is the
# interpreter, torch and the model.
DEFAULT_TILE_RSS_MB = 1536


def test_peak_rss_at_the_default_cpu_tile_within_bound():
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux: the per-call peak RSS mark is reset through /proc/self/clear_refs")
    from fastcount.slide.plan import DEFAULT_CPU_TILE

    p = subprocess.run([sys.executable, "-c", _DEFAULT_TILE_CHILD], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["scope"] == "this call" and r["tile"] == DEFAULT_CPU_TILE and r["tiles"] == 4
    assert r["peak"] <= DEFAULT_TILE_RSS_MB, f"peak RSS {r['peak']:.0f} MiB at the default CPU tile"
    # count_slide hands the pool's idle blocks back when it returns (765 MiB here before it did);
    # buffers still alive then (the last batch's) come back to the pool afterwards: measured 46 MiB
    assert r["idle"] < 128 * 2**20, f"{r['idle'] / 2**20:.0f} MiB left idle in the memory pool"
