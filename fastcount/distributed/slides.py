"""``count_slides``: the client side. Plans each slide, submits its units, merges and writes results."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from distributed import Client, LocalCluster, as_completed
from tqdm import tqdm

from ..api import resolve_model
from ..devices import resolve_device
from ..inference import DEFAULT_BACKEND
from ..inference.rounding import current_rounding
from ..io import default_weights_path, save_model
from ..model import CountCeption
from ..slide.accumulator import Accumulator
from ..slide.engine import _check_run_args, _result
from ..slide.job import SlideJob, plan_job
from ..slide.plan import DEFAULT_CPU_TILE, DEFAULT_TILE, check_tile
from ..slide.readers import open_reader
from ..slide.result import SlideCount
from .table import SlidesResult, row
from .units import FORMAT, load_unit, save_unit, unit_key, unit_ranges
from .worker import ModelFile, UnitResult, UnitSpec, run_unit, worker_device

__all__ = ["count_slides", "local_client", "model_fingerprint", "DEFAULT_SPLIT"]

# Tiles per unit by default: at the default tile a unit is seconds (GPU) to minutes (CPU) of work,
# far above the scheduling overhead per unit (benchmarks/bench_distributed.py).
DEFAULT_SPLIT = 64
_SLIDE_OPTIONS = ("level", "mpp", "tile", "batch_size", "device", "backend", "precision", "mask", "workers",
                  "cell", "queue_depth", "pin_memory")


def local_client(n_workers: int | None = None, *, dashboard_address: str | None = ":0", device="auto") -> Client:
    """A ``Client`` on a new ``LocalCluster`` of process workers, one thread each.

    ``n_workers`` defaults to one per GPU when ``device`` may use CUDA (each
    worker sees only its own GPU through ``CUDA_VISIBLE_DEVICES``), else one
    per CPU core (at most one per 2 GiB of memory). Dask starts process workers
    with one OpenMP thread each, so the workers do not fight over the cores.
    """
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1):
        raise ValueError(f"n_workers must be a positive int or None, got {n_workers!r}")
    n_gpus = torch.cuda.device_count() if str(device) in ("auto", "cuda") else 0
    if n_gpus:
        from distributed import Nanny, Scheduler, SpecCluster

        n = n_workers or n_gpus
        workers = {i: {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i % n_gpus)}}}
                   for i in range(n)}
        cluster = SpecCluster(workers=workers, scheduler={"cls": Scheduler,
                                                          "options": {"dashboard_address": dashboard_address}})
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        n = n_workers or max(1, min(os.cpu_count() or 1, int(mem // (2 << 30)) or 1))
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=dashboard_address)
    return Client(cluster)


def _model_file(model) -> tuple[CountCeption, bytes]:
    """The model (on the CPU, for its geometry) and its weights file as bytes."""
    m = resolve_model(model, "cpu")
    if isinstance(model, (str, os.PathLike)) or model is None:
        return m, Path(model if model is not None else default_weights_path()).read_bytes()
    with tempfile.TemporaryDirectory(prefix="fastcount-model-") as tmp:
        p = save_model(m, Path(tmp) / "model.safetensors", metadata=getattr(m, "metadata", None))
        return m, p.read_bytes()


def model_fingerprint(m: CountCeption) -> str:
    """SHA-1 of the model's config, weights, BN statistics and bf16 rounding (the weights file's bytes
    are not stable: its header's key order varies)."""
    h = hashlib.sha1(json.dumps(m.config, sort_keys=True).encode())
    tensors = dict(m.state_dict())
    rounding = current_rounding(m)
    if rounding is not None:
        extra, meta = rounding.to_state()
        tensors.update(extra)
        h.update(json.dumps(meta, sort_keys=True).encode())
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _mask_key(mask):
    if mask is None or isinstance(mask, str):
        return mask
    a = np.ascontiguousarray(np.asarray(mask))
    return {"shape": list(a.shape), "dtype": str(a.dtype), "sha1": hashlib.sha1(a.tobytes()).hexdigest()}


def _slide_key(source, fp: str, opts: dict, device_type: str) -> str | None:
    """What a saved result must match to be reused; None for in-memory sources (never reused)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    if not os.path.exists(source):
        raise FileNotFoundError(f"slide/image file not found: {source}")
    st = os.stat(source)
    d = {"format": FORMAT, "path": str(Path(source).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
         "model": fp, "device": device_type, "mask": _mask_key(opts["mask"])}
    d.update({k: opts[k] for k in ("level", "mpp", "tile", "batch_size", "cell", "backend", "precision")})
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _names(sources: list) -> list[str]:
    """File stems in ``out_dir`` (disambiguated by a hash of the path when two slides share one)."""
    stems = [Path(s).name.split(".")[0] if isinstance(s, (str, os.PathLike)) else f"array{i}"
             for i, s in enumerate(sources)]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else f"{s}-{hashlib.sha1(str(Path(src).resolve()).encode()).hexdigest()[:8]}"
            for s, src in zip(stems, sources)]


@dataclass
class _Slide:
    index: int
    source: object
    name: str
    key: str | None = None
    job: SlideJob | None = None
    meta: SimpleNamespace | None = None
    specs: dict = field(default_factory=dict)  # first batch -> UnitSpec
    results: dict = field(default_factory=dict)  # first batch -> UnitResult
    resumed: set = field(default_factory=set)  # first batches loaded from unit files
    futures: list = field(default_factory=list)
    plan_seconds: float = 0.0
    t_start: float = 0.0
    error: str | None = None
    count: SlideCount | None = None
    status: str = ""


class _Run:
    """One ``count_slides`` call: plans slides, submits units, merges and writes results."""

    def __init__(self, client, model, opts, split, out_dir, progress):
        self.client, self.opts, self.split, self.progress = client, opts, split, progress
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.model, data = _model_file(model)
        check_tile(opts["tile"], self.model.geometry.stride)
        if self.model.in_channels != 3:
            raise ValueError(f"count_slides reads RGB slides; the model expects {self.model.in_channels} "
                             f"input channels")
        self.fp = model_fingerprint(self.model)
        client.register_plugin(ModelFile(self.fp, data), name=f"fastcount-model-{self.fp[:16]}")
        # The default batch size follows the workers' device (not the client's).
        self.device_type = client.submit(worker_device, opts["device"], pure=False).result()
        self.futures: dict = {}

    # ------------------------------------------------------------------ planning

    def plan(self, sl: _Slide, bar):
        t0 = sl.t_start = time.perf_counter()
        o = self.opts
        sl.key = _slide_key(sl.source, self.fp, o, self.device_type)
        if self.out_dir is not None and sl.key is not None:
            done = _load_finished(self.out_dir, sl.name, sl.key)
            if done is not None:
                sl.count, sl.status = done, "cached"
                return
        reader = open_reader(sl.source, name=str(sl.source) if sl.key else f"sources[{sl.index}]")
        try:
            job = plan_job(reader, self.model.geometry, level=o["level"], mpp=o["mpp"], tile=o["tile"],
                           cell=o["cell"], mask=o["mask"], batch_size=o["batch_size"],
                           device=torch.device(self.device_type))
            sl.meta = SimpleNamespace(name=reader.name, downsamples=list(reader.downsamples),
                                      level_shapes=list(reader.level_shapes), mpp=reader.mpp)
        finally:
            if reader is not sl.source:
                reader.close()
        if job.thumbnail_filler is not None:  # it would be filled from tiles read on the workers
            job = dataclasses.replace(job, thumbnail=None, thumbnail_filler=None)
        sl.job = job
        array = None
        if sl.key is None:  # in-memory pixels: sent to the workers once
            array = self.client.scatter(sl.source, broadcast=True, hash=False)
        for r in unit_ranges(job, self.split):
            spec = UnitSpec(source=str(sl.source) if array is None else None, name=reader.name, level=job.level,
                             tile=job.plan.tile, grid=job.plan.grid, cell=job.cell, batch_size=job.batch_size, first_batch=r.start,
                             batches=tuple(tuple(job.batches[i]) for i in r), model=self.fp, device=o["device"],
                             backend=o["backend"], precision=o["precision"], reader_threads=o["workers"],
                             queue_depth=o["queue_depth"], pin_memory=o["pin_memory"])
            sl.specs[r.start] = spec
            saved = self._saved_unit(sl, spec)
            if saved is not None:
                sl.results[r.start] = saved
                sl.resumed.add(r.start)
                continue
            fut = self.client.submit(run_unit, spec, array, pure=False,
                                     key=f"fastcount-unit-{sl.name}-{r.start}-{uuid.uuid4().hex[:8]}")
            self.futures[fut] = (sl, spec)
            sl.futures.append(fut)
        sl.plan_seconds = time.perf_counter() - t0
        bar.total += len(job.kept)
        bar.update(sum(sl.specs[b].n_tiles for b in sl.resumed))
        if len(sl.results) == len(sl.specs):
            self.finish(sl)

    def _unit_path(self, sl: _Slide, spec: UnitSpec) -> Path | None:
        if self.out_dir is None or sl.key is None:
            return None
        return self.out_dir / ".units" / sl.name / f"{spec.first_batch:08d}.npz"

    def _saved_unit(self, sl, spec):
        p = self._unit_path(sl, spec)
        return load_unit(p, unit_key(sl.key, spec), spec) if p is not None and p.exists() else None

    # ------------------------------------------------------------------ results

    def unit_done(self, sl: _Slide, spec: UnitSpec, res: UnitResult):
        sl.results[spec.first_batch] = res
        p = self._unit_path(sl, spec)
        if p is not None:
            save_unit(p, unit_key(sl.key, spec), res)
        if len(sl.results) == len(sl.specs):
            self.finish(sl)

    def fail(self, sl: _Slide, e: BaseException):
        sl.error = f"{type(e).__name__}: {e}"
        sl.status = "error"
        for f in sl.futures:
            self.futures.pop(f, None)
        self.client.cancel(sl.futures)

    def finish(self, sl: _Slide):
        """Merge the units in batch order (the same adds as ``count_slide``), export, write."""
        job, g = sl.job, self.model.geometry
        acc = Accumulator(len(job.plan.tiles), len(job.batches), job.density_shape, torch.device("cpu"))
        for first in sorted(sl.results):
            for bi, sums in sl.results[first].tile_sums(job.plan.tiles):
                acc.add(bi, sums)
        fresh = [sl.results[b] for b in sl.results if b not in sl.resumed]
        area = sum((t.oy1 - t.oy0) * (t.ox1 - t.ox0) for b in sl.results if b not in sl.resumed
                   for bt in sl.specs[b].batches for t in bt)
        H, W = job.shape
        mpx = area * ((H * W) / (g.full_size(H) * g.full_size(W))) / 1e6
        seconds = sl.plan_seconds + sum(r.seconds for r in fresh)
        stats = {
            "tiles_total": len(job.plan.tiles),
            "tiles_processed": sum(len(r.tile) for r in fresh),
            "tiles_skipped": len(job.plan.tiles) - len(job.kept),
            "tiles_resumed": sum(len(sl.results[b].tile) for b in sl.resumed),
            "batches": len(job.batches),
            "batch_size": job.batch_size,
            "tile": job.plan.tile,
            "units": len(sl.specs),
            "split": self.split,
            "seconds": seconds,  # planning on the client + this slide's units on the workers
            "wall_seconds": time.perf_counter() - sl.t_start,
            "compute_seconds": sum(r.compute_seconds for r in fresh),
            "megapixels": mpx,
            "megapixels_per_s": mpx / seconds if seconds > 0 else 0.0,
            "slide_megapixels": H * W / 1e6,
            "mask": job.mask_info,
            "level": job.level,
            "backend": sorted({r.backend for r in sl.results.values()}) or [self.opts["backend"]],
            "precision": self.opts["precision"],
            "device": sorted({r.device for r in sl.results.values()}) or [self.device_type],
            "run_key": sl.key,
        }
        density = acc.state()[2] / g.redundancy
        sl.count = _result(job, sl.meta, g, acc.total(job.kept, g.redundancy), density, stats)
        sl.status = "ok"
        if self.out_dir is not None:
            _write_slide(self.out_dir, sl.name, sl.count)
        sl.results.clear()  # the unit data is in the total and the density now
        sl.job = sl.meta = None  # the tile plan is no longer needed: keep the client's memory per slide small

    def rows(self, slides: list[_Slide]) -> SlidesResult:
        rows, counts = [], []
        for sl in slides:
            src = sl.source if isinstance(sl.source, (str, os.PathLike)) else f"sources[{sl.index}]"
            if sl.count is None:
                rows.append(row(src, None, None, None, None, None, "error", sl.error or "not finished"))
                counts.append(None)
                continue
            st = sl.count.stats
            rows.append(row(src, float(sl.count.total), int(st["tiles_total"] - st["tiles_skipped"]),
                             int(st["tiles_skipped"]), float(st["seconds"]), float(st["megapixels_per_s"]),
                             sl.status))
            counts.append(sl.count)
        return SlidesResult(rows, counts)


def _result_paths(out_dir: Path, name: str) -> tuple[Path, Path, Path]:
    return out_dir / f"{name}.json", out_dir / f"{name}.heatmap.png", out_dir / f"{name}.geojson"


def _write_slide(out_dir: Path, name: str, count: SlideCount):
    """The slide's heatmap and GeoJSON, then its JSON (last: a slide with a JSON is complete)."""
    j, png, gj = _result_paths(out_dir, name)
    count.save_heatmap(png)
    count.to_geojson(gj)
    count.to_json(j)
    shutil.rmtree(out_dir / ".units" / name, ignore_errors=True)


def _load_finished(out_dir: Path, name: str, key: str) -> SlideCount | None:
    """The slide's saved result if it is complete and from the same run, else None (count it again)."""
    j, png, gj = _result_paths(out_dir, name)
    try:
        if not (png.stat().st_size and gj.stat().st_size):
            return None
        d = json.loads(j.read_text())
        if d["stats"].get("run_key") != key:
            return None
        density = np.asarray(d["density"], dtype=np.float64).reshape(tuple(d["density_shape"]))
        total = float(d["total"])
        if not math.isfinite(total):
            return None
        return SlideCount(total=total, density=density, cell=int(d["cell"]), stats=d["stats"], source=d["source"],
                          level=int(d["level"]), shape=tuple(d["shape"]), downsample=float(d["downsample"]),
                          level0_shape=None if d["level0_shape"] is None else tuple(d["level0_shape"]),
                          patch_size=int(d["patch_size"]), stride=int(d["stride"]), mpp=d["mpp"])
    except Exception:  # missing, truncated or not ours: count it again
        return None


def _check_options(options: dict) -> dict:
    bad = sorted(set(options) - set(_SLIDE_OPTIONS))
    if bad:
        extra = " (out_dir is count_slides' resume mechanism)" if {"checkpoint", "checkpoint_every"} & set(bad) else ""
        raise TypeError(f"count_slides got unexpected options {bad}; it takes {list(_SLIDE_OPTIONS)}{extra}")
    o = {"level": 0, "mpp": None, "tile": None, "batch_size": None, "device": "auto",
         "backend": DEFAULT_BACKEND, "precision": "fp32", "mask": "auto", "workers": None, "cell": None,
         "queue_depth": None, "pin_memory": None}
    o.update(options)
    _check_run_args(o["batch_size"], o["workers"], o["queue_depth"], 30.0, o["mask"])
    return o


def count_slides(sources, model=None, *, client: Client | None = None, out_dir=None, split: int | None = None,
                 progress: bool = True, **options) -> SlidesResult:
    """Count many slides (and giant ones) on a Dask cluster, exactly: each total equals ``count_slide``'s.

    Args:
        sources: paths (slides or images; the workers must see them at the same
            path) or in-memory arrays (copied to every worker once), or one path.
        model: a ``CountCeption``, a weights path, or None for the default weights.
            It goes to each worker once, as a weights file.
        client: a ``dask.distributed.Client`` (local, dask-jobqueue, Kubernetes...).
            None: a ``local_client()`` is started for this call and closed after.
        out_dir: folder for each slide's ``<name>.json``, ``<name>.heatmap.png`` and
            ``<name>.geojson``, written as it finishes, and for finished units; a rerun
            skips complete slides and resumes the others (path sources only).
        split: most tiles per unit of work (default ``DEFAULT_SPLIT``); a slide with
            more kept tiles is cut into several units that run on different workers.
        progress: one tqdm bar over all tiles of all slides (and the dashboard link).
        **options: ``count_slide``'s ``level, mpp, tile, batch_size, device, backend,
            precision, mask, workers, cell, queue_depth, pin_memory``; ``device``
            is resolved on each worker (``"auto"``: its own GPU if it has one).

    Returns:
        ``SlidesResult``; a slide that fails (e.g. an unreadable file) is a row with
        status ``"error"`` and its message, and the other slides go on.
    """
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "shape"):
        sources = [sources]
    try:
        sources = list(sources)
    except TypeError:
        raise TypeError(f"sources must be paths or arrays (an iterable of them), got {type(sources).__name__}") \
            from None
    if not sources:
        raise ValueError("sources is empty: give at least one slide path or array")
    split = DEFAULT_SPLIT if split is None else split
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive int (most tiles per unit of work) or None, got {split!r}")
    opts = _check_options(options)
    own = client is None
    if own:
        client = local_client(device=opts["device"])
    try:
        if opts["tile"] is None:
            opts["tile"] = _workers_default_tile(client, opts["device"])
        return _count(client, sources, model, opts, split, out_dir, progress)
    finally:
        if own:
            cluster = client.cluster
            client.close()
            cluster.close()


def _workers_default_tile(client, device) -> int:
    """The tile ``count_slide`` would pick on the workers' device (slides are planned here, on the client)."""
    types = client.run(_device_type, device)  # {worker address: "cpu" | "cuda" | ...}
    return DEFAULT_TILE if types and all(t != "cpu" for t in types.values()) else DEFAULT_CPU_TILE


def _device_type(device) -> str:
    return resolve_device(device).type


def _count(client, sources, model, opts, split, out_dir, progress) -> SlidesResult:
    run = _Run(client, model, opts, split, out_dir, progress)
    if progress:
        link = _dashboard_link(client)
        if link:
            print(f"fastcount: Dask dashboard at {link}", file=sys.stderr)
    slides = [_Slide(i, s, n) for i, (s, n) in enumerate(zip(sources, _names(sources)))]
    with tqdm(total=0, unit="tile", disable=not progress, desc=f"count {len(slides)} slides",
              dynamic_ncols=True) as bar:
        try:
            for sl in slides:
                try:
                    run.plan(sl, bar)
                except Exception as e:
                    run.fail(sl, e)
                bar.refresh()
            done = as_completed(list(run.futures))
            for fut in done:
                if fut not in run.futures:
                    continue  # cancelled with its slide
                sl, spec = run.futures.pop(fut)
                sl.futures.remove(fut)
                try:
                    res = fut.result()
                    fut.release()  # the result is here now: the worker may drop it
                    bar.update(spec.n_tiles)
                    run.unit_done(sl, spec, res)
                except Exception as e:
                    run.fail(sl, e)
                if _AFTER_UNIT is not None:
                    _AFTER_UNIT(client)
        finally:
            client.cancel(list(run.futures))
    return run.rows(slides)


_AFTER_UNIT = None  # tests only: called with the client after each finished unit


def _dashboard_link(client) -> str:
    try:
        return client.dashboard_link if "dashboard" in client.scheduler_info().get("services", {}) else ""
    except Exception:
        return ""
