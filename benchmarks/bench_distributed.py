"""count_slides on a LocalCluster: 8 slides on 1 and 2 workers, and the scheduling cost of one unit.

    python -m pytest benchmarks/bench_distributed.py --benchmark-only -s \
        --benchmark-json=/tmp/bench_distributed.json

Cases (one round each, after a warm-up round that builds the model on every worker):
- ``count_slide_loop``: the baseline, ``count_slide`` on the 8 slides one after another in this process
  (torch limited to one thread, as each Dask process worker is).
- ``eight_slides[1]``, ``eight_slides[2]``: ``count_slides`` of the same 8 slides on a LocalCluster
  of 1 and 2 process workers (one thread each). Totals are checked equal to the baseline's.
- ``scaling_alternating``: 1 and 2 workers alternately, two rounds each, in one test (both clusters
  alive): the best-of-two speed-up, less exposed to load that changes between tests.
- ``empty_units``: 200 units with no tiles (open the slide, look up the cached model, return):
  the per-unit cost a ``split`` must dwarf; beside it ``noop_tasks``, 200 Dask tasks that do nothing.
``extra_info`` carries seconds, Mpx/s of slide counted and, for units, milliseconds per unit.
"""
import os
import time

import pytest
import torch

import fastcount
import fastcount.distributed as fd
from fastcount.distributed import slides as fd_slides, worker as fd_worker
from fastcount.data.synth import write_synthetic_slide
from fastcount.testing import randomize_bn

SIDE, TILE, N_SLIDES, WIDTH = 768, 256, 8, 0.25


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(fastcount.CountCeption(width=WIDTH), seed=0).eval()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_slides")
    return [str(write_synthetic_slide(d / f"s{i}.tif", SIDE, seed=i, tissue_fraction=0.3)["path"])
            for i in range(N_SLIDES)]


@pytest.fixture(scope="module")
def baseline(model, slides):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [fastcount.count_slide(p, model, tile=TILE, progress=False).total for p in slides]
    finally:
        torch.set_num_threads(n)


def _print(benchmark, **info):
    benchmark.extra_info.update(info)
    print("\n" + benchmark.name + ": " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in info.items()))


def test_count_slide_loop(benchmark, model, slides, baseline):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(lambda: [fastcount.count_slide(p, model, tile=TILE, progress=False) for p in slides],
                           rounds=1, warmup_rounds=0)
    finally:
        torch.set_num_threads(n)
    s = benchmark.stats.stats.median
    _print(benchmark, seconds=s, slide_megapixels_per_s=N_SLIDES * SIDE * SIDE / 1e6 / s, load=os.getloadavg()[0])


@pytest.mark.parametrize("workers", [1, 2])
def test_eight_slides(benchmark, model, slides, baseline, workers):
    client = fd.local_client(workers, dashboard_address=":0")
    try:
        out = {}

        def run():
            out["res"] = fastcount.count_slides(slides, model, client=client, tile=TILE, progress=False)

        benchmark.pedantic(run, rounds=1, warmup_rounds=1)
        assert out["res"].totals == baseline
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    s = benchmark.stats.stats.median
    _print(benchmark, workers=workers, seconds=s, slide_megapixels_per_s=N_SLIDES * SIDE * SIDE / 1e6 / s,
           load=os.getloadavg()[0])


def test_scaling_alternating(benchmark, model, slides, baseline):
    """1 and 2 workers alternately, twice, in one test: the same-run ratio a shared machine allows."""
    clients = {n: fd.local_client(n, dashboard_address=":0") for n in (1, 2)}
    times = {1: [], 2: []}
    try:
        for c in clients.values():  # warm-up: the model is built on every worker
            fastcount.count_slides(slides, model, client=c, tile=TILE, progress=False)

        def pair():
            for n, c in clients.items():
                t0 = time.perf_counter()
                res = fastcount.count_slides(slides, model, client=c, tile=TILE, progress=False)
                times[n].append(time.perf_counter() - t0)
                assert res.totals == baseline

        benchmark.pedantic(pair, rounds=2, warmup_rounds=0)
    finally:
        for c in clients.values():
            cluster = c.cluster
            c.close()
            cluster.close()
    t1, t2 = sorted(times[1])[0], sorted(times[2])[0]
    _print(benchmark, seconds_1_worker=times[1], seconds_2_workers=times[2], speedup_2_over_1_best=t1 / t2,
           load=os.getloadavg()[0])


@pytest.fixture(scope="module")
def client2():
    c = fd.local_client(2, dashboard_address=":0")
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


def _noop(i):
    return i


def test_noop_tasks(benchmark, client2):
    benchmark.pedantic(lambda: client2.gather(client2.map(_noop, range(200), pure=False)), rounds=3,
                       warmup_rounds=1)
    s = benchmark.stats.stats.median
    _print(benchmark, ms_per_task=s / 200 * 1e3)


def test_empty_units(benchmark, client2, model, slides):
    # Register the model and build it on both workers (as a real run would, once), then time units of no tiles.
    fastcount.count_slides(slides[:2], model, client=client2, tile=TILE, progress=False)
    fp = fd_slides.model_fingerprint(model)
    specs = [fd_worker.UnitSpec(source=slides[i % N_SLIDES], name=slides[i % N_SLIDES], level=0, tile=TILE, grid=(0, 0), cell=8, batch_size=1,
                          first_batch=0, batches=(), model=fp, device="cpu", backend="auto", precision="fp32",
                          reader_threads=None, queue_depth=None, pin_memory=None) for i in range(200)]

    def run():
        t0 = time.perf_counter()
        client2.gather(client2.map(fd_worker.run_unit, specs, pure=False))
        return time.perf_counter() - t0

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    s = benchmark.stats.stats.median
    _print(benchmark, ms_per_unit=s / 200 * 1e3)
