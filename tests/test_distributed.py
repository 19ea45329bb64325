"""count_slides on a Dask LocalCluster (2 process workers): exact totals, faults, resume, the table, the CLI."""
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("distributed", reason="needs dask.distributed (pip install 'fastcount[distributed]')")

from distributed import Client, LocalCluster  # noqa: E402

import fastcount.distributed as fd  # noqa: E402
from fastcount.distributed import slides as fd_slides, worker as fd_worker  # noqa: E402
from conftest import randomize_bn  # noqa: E402
from fastcount import CountCeption, count_slide, count_slides, save_model  # noqa: E402
from fastcount.cli import main  # noqa: E402
from fastcount.data.synth import write_synthetic_slide  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TILE = 64  # 256 px slides: a few dozen tiles each


@pytest.fixture(scope="module")
def client():
    # Process workers start with one OpenMP thread each, like the one_thread client side.
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(CountCeption(width=0.0625), seed=3).eval()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    paths = [write_synthetic_slide(d / f"s{i}.tif", (256, 224 + 16 * i), seed=i, tissue_fraction=0.3,
                                   n_regions=1)["path"] for i in range(2)]
    bad = d / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    return [str(p) for p in paths], str(bad)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(5).integers(0, 256, (150, 170, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(model, slides, image):
    """count_slide's results, one machine, one process."""
    paths, _ = slides
    return [count_slide(p, model, tile=TILE, progress=False) for p in paths] + \
        [count_slide(image, model, tile=TILE, mask=None, progress=False)]


def _same(a, b):
    assert a.total == b.total  # bit for bit
    assert np.array_equal(a.density, b.density)
    assert a.stats["tiles_skipped"] == b.stats["tiles_skipped"]


@pytest.fixture(scope="module")
def split_run(client, model, slides, reference):
    paths, bad = slides
    return count_slides(paths + [bad, paths[0] + ".missing.tif"], model, client=client, tile=TILE, split=3,
                        progress=False)


def test_totals_equal_count_slide_exactly_split_and_unsplit(client, model, slides, image, reference, split_run):
    paths, _ = slides
    for ref, got in zip(reference[:2], split_run.counts):
        _same(got, ref)
        kept = got.stats["tiles_total"] - got.stats["tiles_skipped"]
        assert got.stats["units"] >= -(-kept // 3) > 1  # at most 3 tiles per unit
    whole = count_slides(paths, model, client=client, tile=TILE, progress=False)  # one unit per slide
    for ref, got in zip(reference[:2], whole.counts):
        assert got.stats["units"] == 1
        _same(got, ref)
    arr = count_slides([image], model, client=client, tile=TILE, mask=None, split=4, progress=False)
    _same(arr.counts[0], reference[2])
    assert arr.rows[0]["source"] == "sources[0]" and arr.rows[0]["status"] == "ok"


def test_a_failing_slide_is_a_row_and_the_others_go_on(split_run, slides):
    rows = split_run.rows
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    assert "broken.tif" in rows[2]["error"] and "missing" in rows[3]["error"]
    assert "FileNotFoundError" in rows[3]["error"]
    assert rows[2]["total"] is None and split_run.counts[2] is None
    ok = rows[0]
    assert ok["tiles_counted"] + ok["tiles_skipped"] == split_run.counts[0].stats["tiles_total"]
    assert ok["tiles_skipped"] > 0 and ok["seconds"] > 0 and ok["megapixels_per_s"] > 0


def test_csv_and_parquet_round_trip(split_run, tmp_path):
    assert fd.SlidesResult.read_csv(split_run.to_csv(tmp_path / "t.csv")) == split_run.rows
    assert fd.SlidesResult.read_parquet(split_run.to_parquet(tmp_path / "t.parquet")) == split_run.rows
    assert list(split_run.rows[0]) == list(fd.COLUMNS)


def test_units_carry_no_pixels_and_no_model(slides, model):
    """A unit is its tiles' coordinates: the workers read the pixels and hold the model."""
    from fastcount.slide import open_reader
    from fastcount.slide.job import plan_job

    paths, _ = slides
    job = plan_job(open_reader(paths[0]), model.geometry, level=0, mpp=None, tile=TILE, cell=None, mask="auto",
                   batch_size=1, device=torch.device("cpu"))
    spec = fd_worker.UnitSpec(source=paths[0], name=paths[0], level=0, tile=job.plan.tile, grid=job.plan.grid,
                              cell=job.cell, batch_size=1, first_batch=0,
                        batches=tuple(tuple(b) for b in job.batches[:3]), model="f" * 40, device="auto",
                        backend="auto", precision="fp32", reader_threads=None, queue_depth=None, pin_memory=None)
    assert len(pickle.dumps(spec)) < 4000


def test_each_worker_builds_the_model_once(client, model, slides, split_run, capsys):
    """A second run with the same model builds nothing on the workers: each kept its model.
    (With progress: one bar over the tiles, and the dashboard link.)"""
    paths, _ = slides
    before = client.run(lambda: fd_worker._BUILDS)
    assert sum(before.values()) >= 1
    count_slides(paths[:1], model, client=client, tile=TILE, split=2, progress=True)
    err = capsys.readouterr().err
    assert "Dask dashboard at http" in err and "count 1 slides" in err and "tile" in err
    after = client.run(lambda: fd_worker._BUILDS)
    assert {w: after[w] for w in before if w in after} == {w: before[w] for w in before if w in after}


def test_resume_skips_finished_slides_and_partial_ones_continue(client, model, slides, reference, tmp_path,
                                                                monkeypatch):
    paths, _ = slides
    out = tmp_path / "out"
    first = count_slides(paths[:1], model, client=client, tile=TILE, out_dir=out, progress=False)
    _same(first.counts[0], reference[0])
    done_json = out / "s0.json"
    for f in ("s0.json", "s0.heatmap.png", "s0.geojson"):
        assert (out / f).stat().st_size > 0
    assert json.loads(done_json.read_text())["total"] == reference[0].total
    mtime = done_json.stat().st_mtime_ns

    class Stop(Exception):
        pass

    seen = []

    def stop_after_three(_client):
        seen.append(1)
        if len(seen) == 3:
            raise Stop

    monkeypatch.setattr(fd_slides, "_AFTER_UNIT", stop_after_three)
    with pytest.raises(Stop):
        count_slides(paths, model, client=client, tile=TILE, split=2, out_dir=out, progress=False)
    monkeypatch.setattr(fd_slides, "_AFTER_UNIT", None)
    units = sorted((out / ".units" / "s1").glob("*.npz"))
    assert len(units) == 3 and not (out / "s1.json").exists()
    saved = [int(np.load(u)["tile"].size) for u in units]
    units[0].write_bytes(units[0].read_bytes()[:100])  # a damaged unit is recomputed, never trusted

    again = count_slides(paths, model, client=client, tile=TILE, split=2, out_dir=out, progress=False)
    assert [r["status"] for r in again.rows] == ["cached", "ok"]
    assert done_json.stat().st_mtime_ns == mtime
    assert again.counts[0].total == reference[0].total
    np.testing.assert_array_equal(again.counts[0].density, reference[0].density)
    st = again.counts[1].stats
    assert st["tiles_resumed"] == sum(saved[1:])
    assert st["tiles_processed"] == st["tiles_total"] - st["tiles_skipped"] - sum(saved[1:])
    _same(again.counts[1], reference[1])
    assert json.loads((out / "s1.json").read_text())["total"] == reference[1].total
    assert not (out / ".units" / "s1").exists()


def test_a_killed_worker_loses_only_its_unit(client, model, slides, reference, monkeypatch):
    paths, _ = slides
    client.run(fd_worker.set_test_unit_delay, 0.5)  # units outlast the kill, so one is surely in flight
    killed = []

    def kill_a_busy_worker(c):
        if killed:
            return
        busy = [w for w, keys in c.processing().items() if keys]
        pid = c.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    monkeypatch.setattr(fd_slides, "_AFTER_UNIT", kill_a_busy_worker)
    try:
        res = count_slides(paths, model, client=client, tile=TILE, split=4, progress=False)
    finally:
        monkeypatch.setattr(fd_slides, "_AFTER_UNIT", None)
        client.run(fd_worker.set_test_unit_delay, 0.0)
    assert killed and killed[0] not in client.run(os.getpid).values()
    client.wait_for_workers(2, timeout=60)  # the restarted worker received the model too
    fp = fd_slides.model_fingerprint(model)
    assert all(fp in fps for fps in client.run(lambda: list(fd_worker._MODEL_FILES)).values())
    for ref, got in zip(reference[:2], res.counts):
        _same(got, ref)


def test_cli_counts_many_slides_from_globs_and_lists(client, model, slides, reference, tmp_path, capsys):
    paths, bad = slides
    weights = save_model(model, tmp_path / "m.safetensors")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# slides\n{paths[1]}\n{bad}\n")
    pattern = os.path.join(os.path.dirname(paths[0]), "s0*.tif")
    rc = main(["count", pattern, str(listing), "--weights", str(weights), "--tile", str(TILE), "--quiet",
               "--out-dir", str(tmp_path / "o"), "--scheduler", client.scheduler.address,
               "--summary", str(tmp_path / "summary.parquet")])
    assert rc == 1  # one slide failed; the others were counted
    rows = fd.SlidesResult.read_parquet(tmp_path / "summary.parquet")
    assert [r["total"] for r in rows[:2]] == [r.total for r in reference[:2]]
    assert rows[2]["status"] == "error" and "broken.tif" in rows[2]["error"]
    assert (tmp_path / "o" / "s1.geojson").exists()
    assert "3 slides: 2 counted, 1 failed" in capsys.readouterr().out


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="checkpoint"):
        count_slides(["a.tif"], checkpoint="x.npz")
    with pytest.raises(ValueError, match="split"):
        count_slides(["a.tif"], split=0)
    with pytest.raises(ValueError, match="sources"):
        count_slides([])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        fd.expand_sources(["/nonexistent/*.svs"])


def test_import_fastcount_does_not_import_dask():
    code = ("import sys, fastcount; assert 'distributed' not in sys.modules; fastcount.count_slides; "
            "assert 'distributed' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_local_client_starts_one_worker_per_gpu(monkeypatch):
    """Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), so device="auto" picks it."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    c = fd.local_client(dashboard_address=None)
    try:
        c.wait_for_workers(2)
        assert sorted(c.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"]).values()) == ["0", "1"]
    finally:
        cluster = c.cluster
        c.close()
        cluster.close()


@pytest.mark.slow
def test_without_a_client_a_local_cluster_is_started_and_closed(model, slides, reference):
    paths, _ = slides
    res = count_slides(paths[:1], model, tile=TILE, progress=False)
    _same(res.counts[0], reference[0])
    c = fd.local_client(dashboard_address=":0")
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if mem < os.cpu_count() * (2 << 30):
            pytest.skip("this machine has under 2 GiB of memory per core (local_client then starts fewer workers)")
        assert len(c.scheduler_info()["workers"]) == os.cpu_count()  # one process worker per core
    finally:
        cluster = c.cluster
        c.close()
        cluster.close()
