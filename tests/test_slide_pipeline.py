"""The slide engine's parts plug together: tile consumers, a split schedule merged, prefetch order."""
import numpy as np
import pytest
import torch

from conftest import randomize_bn
from fastcount import CountCeption, count_slide
from fastcount.inference import compile as compile_backend
from fastcount.slide import open_reader
from fastcount.slide.accumulator import Accumulator
from fastcount.slide.engine import run_batches
from fastcount.slide.job import plan_job
from fastcount.slide.plan import plan_tiles
from fastcount.slide.prefetch import prefetch

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(CountCeption(width=0.0625), seed=2).eval()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (90, 110, 3), dtype=np.uint8)


def _job(model, image, batch_size=2):
    reader = open_reader(image)
    job = plan_job(reader, model.geometry, level=0, mpp=None, tile=32, cell=None, mask=None,
                   batch_size=batch_size, device=CPU)
    return reader, job


def _count(job, reader, fn, order, consumers=()):
    acc = Accumulator(len(job.plan.tiles), len(job.batches), job.density_shape, CPU)
    reads = prefetch(reader, job.level, job.batches, order, workers=2, depth=2, pin=False)
    run_batches(job, fn, acc, reads, CPU, consumers=consumers)
    return acc


def test_split_schedule_merged_equals_one_run(model, image):
    reader, job = _job(model, image)
    fn = compile_backend(model, "eager", "fp32", CPU)
    ref = count_slide(image, model, tile=32, batch_size=2, mask=None, progress=False, backend="eager")
    n = len(job.batches)
    assert n >= 4
    first = _count(job, reader, fn, range(0, n, 2))
    second = _count(job, reader, fn, list(range(1, n, 2))[::-1])  # other half, backwards
    first.merge(second)
    assert first.done.all() and first.tiles_added == len(job.kept)
    R = model.geometry.redundancy
    assert first.total(job.kept, R) == ref.total  # identical: fsum over tiles in tile order
    np.testing.assert_allclose(first.state()[2] / R, ref.density, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="counted twice"):
        first.merge(second)


def test_consumers_see_every_tile_crop(model, image):
    reader, job = _job(model, image, batch_size=3)
    fn = compile_backend(model, "eager", "fp32", CPU)
    seen, pixels = {}, {}

    def consume(t, piece, px):
        seen.setdefault(t.index, piece.clone())
        pixels.setdefault(t.index, px.clone())

    acc = _count(job, reader, fn, range(len(job.batches)), consumers=[consume])
    assert sorted(seen) == [t.index for t in job.kept]
    whole = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    for t in job.kept:
        # each consumer also gets the tile's input pixels, exactly as read
        torch.testing.assert_close(pixels[t.index], whole[:, t.iy0 : t.iy1, t.ix0 : t.ix1], rtol=0, atol=0)
        assert seen[t.index].dtype == torch.float64
        assert seen[t.index].shape == (t.cy1 - t.cy0, t.cx1 - t.cx0)
        assert float(seen[t.index].sum()) == acc.sums[t.index]


def test_prefetch_yields_in_the_order_asked(image):
    reader = open_reader(image)
    tiles = plan_tiles(90, 110, 32, CountCeption(width=0.0625).geometry).tiles
    batches = [[t] for t in tiles]
    order = [5, 0, 3, 1]
    got = [(i, x.shape) for i, x in prefetch(reader, 0, batches, order, workers=3, depth=2, pin=False)]
    assert [i for i, _ in got] == order
    for i, shape in got:
        assert shape == (1, *batches[i][0].in_shape, 3)
