"""Counting many slides, and giant ones, on a Dask cluster: exactly and resumably.

``count_slides(sources, model, client=...)`` plans each slide once on the
client (level, tile plan, tissue mask: ``slide/job.py``) and cuts its batches
into *units* of at most ``split`` tiles. A unit is a small task: the slide's
path (never its pixels; arrays are scattered once) and the tiles of its
batches. The worker opens the reader itself, runs the batches through the
engine's own ``run_batches`` and returns each tile's float64 sum and density
blocks. The client adds them into an ``Accumulator`` in batch order, so the
total is the same ``math.fsum`` over per-tile sums in tile order as
``count_slide``'s: bit for bit the single-machine result, whichever worker
ran which unit, and however often a unit was rerun after a worker died.

The model travels once per worker: its safetensors bytes are registered as a
worker plugin (new and restarted workers receive it too) and each worker
builds and compiles it once per device, keyed by the bytes' SHA-1.

With ``out_dir`` every finished unit is saved atomically under
``out_dir/.units/<slide>/`` and every finished slide's JSON, heatmap and
GeoJSON are written as it finishes (the JSON last: it marks the slide done).
A rerun skips slides whose results are there and belong to the same run, and
resumes the others from their saved units; a unit or result file that does
not validate is recomputed, never trusted.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from distributed import Client, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm

from .api import resolve_model
from .devices import resolve_device
from .files import atomic_path
from .inference import DEFAULT_BACKEND
from .inference import compile as compile_backend
from .inference.rounding import current_rounding
from .io import default_weights_path, load_model, save_model
from .model import CountCeption
from .slide.accumulator import Accumulator, TileSum
from .slide.engine import _check_run_args, _result, run_batches
from .slide.job import SlideJob, plan_job
from .slide.plan import DEFAULT_TILE, Tile, check_tile
from .slide.prefetch import prefetch
from .slide.readers import open_reader
from .slide.result import SlideCount

__all__ = ["count_slides", "SlidesResult", "local_client", "expand_sources", "count_from_cli", "DEFAULT_SPLIT", "COLUMNS"]

# Tiles per unit by default: at the default tile a unit is seconds (GPU) to minutes (CPU) of work,
# far above the scheduling overhead per unit (benchmarks/bench_distributed.py).
DEFAULT_SPLIT = 64
# Columns of the per-slide table (CSV / Parquet).
COLUMNS = ("source", "total", "tiles_counted", "tiles_skipped", "seconds", "megapixels_per_s", "status", "error")
_SLIDE_OPTIONS = ("level", "mpp", "tile", "batch_size", "device", "backend", "precision", "mask", "workers",
                  "cell", "queue_depth", "pin_memory")
_FORMAT = 1  # of unit files and run keys


# =========================================================================== worker side

_MODEL_FILES: dict[str, bytes] = {}  # model fingerprint -> safetensors bytes (from the plugin)
_BACKENDS: dict[tuple, tuple] = {}  # (fingerprint, device, backend, precision) -> (fn, name, lock)
_CACHE_LOCK = threading.Lock()
_BUILDS = 0  # models this worker has built (each is then kept for every task)
_TEST_UNIT_DELAY = 0.0  # seconds each unit waits before returning (tests only: makes kill timing certain)


class _ModelFile(WorkerPlugin):
    """Puts the model's weights file (bytes) on every worker, including ones that join or restart later."""

    def __init__(self, fingerprint: str, data: bytes):
        self.fingerprint, self.data = fingerprint, data

    def setup(self, worker=None):
        _MODEL_FILES[self.fingerprint] = self.data


def _set_test_unit_delay(seconds: float):
    global _TEST_UNIT_DELAY
    _TEST_UNIT_DELAY = float(seconds)


def _worker_backend(fp: str, dev: torch.device, backend: str, precision: str):
    """The compiled model of fingerprint ``fp`` on ``dev``: built once per worker and kept."""
    global _BUILDS
    key = (fp, str(dev), backend, precision)
    with _CACHE_LOCK:
        if key not in _BACKENDS:
            _BUILDS += 1
            if fp not in _MODEL_FILES:
                raise RuntimeError(f"model {fp[:12]} was not registered on this worker")
            with tempfile.TemporaryDirectory(prefix="fastcount-model-") as tmp:
                path = Path(tmp) / "model.safetensors"
                path.write_bytes(_MODEL_FILES[fp])
                model = load_model(path, device=dev)
            fn = compile_backend(model, backend, precision, dev)
            # One unit at a time per compiled model: backends keep per-call buffers.
            _BACKENDS[key] = (fn, getattr(fn, "name", backend), threading.Lock())
        return _BACKENDS[key]


def _worker_device(device) -> str:
    return resolve_device(device).type


@dataclass(frozen=True)
class _UnitSpec:
    """One unit of work: batches ``first_batch ..`` of a slide's job (their tiles travel, the pixels do not)."""

    source: str | None  # path; None when the array comes as the task's second argument
    name: str
    level: int
    cell: int
    batch_size: int
    first_batch: int
    batches: tuple  # tuple of tuples of Tile
    model: str  # fingerprint
    device: object
    backend: str
    precision: str
    reader_threads: int | None
    queue_depth: int | None
    pin_memory: bool | None

    @property
    def n_tiles(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass
class _UnitResult:
    """Per tile, in the order they were added: batch, tile index, float64 sum, density blocks."""

    batch: np.ndarray  # (n,) int64 global batch index
    tile: np.ndarray  # (n,) int64
    sums: np.ndarray  # (n,) float64
    pos: np.ndarray  # (n, 2) int64 first block row, col
    shape: np.ndarray  # (n, 2) int64 block grid shape
    blocks: np.ndarray  # (sum of shape products,) float64, concatenated
    compute_seconds: float
    seconds: float  # the unit's wall time on its worker
    device: str
    backend: str

    def tile_sums(self, tiles: list[Tile]):
        """``(batch, [TileSum])`` in order, with ``tiles`` the job's plan tiles."""
        ends = np.cumsum(self.shape[:, 0] * self.shape[:, 1])
        starts = ends - self.shape[:, 0] * self.shape[:, 1]
        out: list[tuple[int, list[TileSum]]] = []
        for k in range(len(self.tile)):
            blk = torch.from_numpy(self.blocks[starts[k] : ends[k]].reshape(tuple(self.shape[k])))
            ts = TileSum(tiles[int(self.tile[k])], float(self.sums[k]), int(self.pos[k, 0]), int(self.pos[k, 1]), blk)
            if not out or out[-1][0] != int(self.batch[k]):
                out.append((int(self.batch[k]), []))
            out[-1][1].append(ts)
        return out


class _Recorder:
    """Takes the place of the ``Accumulator`` in ``run_batches``: keeps each tile's sums on the host."""

    def __init__(self, first_batch: int):
        self.first_batch = first_batch
        self.results: list[tuple[int, TileSum]] = []

    def add(self, batch: int, results: list[TileSum]):
        self.results.extend((self.first_batch + batch, r) for r in results)

    def commit(self):
        pass

    def unit_result(self, **info) -> _UnitResult:
        rs = self.results
        blocks = [r.blocks.detach().cpu().numpy().ravel() for _, r in rs]
        return _UnitResult(
            batch=np.array([b for b, _ in rs], dtype=np.int64),
            tile=np.array([r.tile.index for _, r in rs], dtype=np.int64),
            sums=np.array([r.total for _, r in rs], dtype=np.float64),
            pos=np.array([(r.block_row, r.block_col) for _, r in rs], dtype=np.int64).reshape(-1, 2),
            shape=np.array([tuple(r.blocks.shape) for _, r in rs], dtype=np.int64).reshape(-1, 2),
            blocks=np.concatenate(blocks) if blocks else np.zeros(0), **info)


def _run_unit(spec: _UnitSpec, array=None) -> _UnitResult:
    """Count one unit on this worker (the task every unit runs)."""
    t0 = time.perf_counter()
    dev = resolve_device(spec.device)
    fn, backend_name, lock = _worker_backend(spec.model, dev, spec.backend, spec.precision)
    source = spec.source if array is None else array
    reader = open_reader(source, name=spec.name)
    try:
        # The unit's own job: its batches only, numbered from 0 (the recorder adds first_batch back).
        job = SlideJob(level=spec.level, shape=tuple(reader.level_shapes[spec.level]), plan=None, kept=[],
                       batches=[list(b) for b in spec.batches], batch_size=spec.batch_size, cell=spec.cell,
                       thumbnail=None, thumbnail_filler=None, mask_info={})
        n_threads = spec.reader_threads or min(4, os.cpu_count() or 1)
        depth = spec.queue_depth or n_threads + 1
        pin = (dev.type == "cuda") if spec.pin_memory is None else bool(spec.pin_memory)
        rec = _Recorder(spec.first_batch)
        with lock, torch.inference_mode():
            reads = prefetch(reader, spec.level, job.batches, range(len(job.batches)), workers=n_threads,
                             depth=depth, pin=pin)
            t_compute = run_batches(job, fn, rec, reads, dev)
    finally:
        if reader is not source:
            reader.close()
    if _TEST_UNIT_DELAY:
        time.sleep(_TEST_UNIT_DELAY)
    return rec.unit_result(compute_seconds=t_compute, seconds=time.perf_counter() - t0, device=str(dev),
                           backend=backend_name)


# =========================================================================== unit files


def _unit_key(slide_key: str, spec: _UnitSpec) -> str:
    h = hashlib.sha1(slide_key.encode())
    for b in spec.batches:
        h.update(np.array([t.index for t in b] + [-1], dtype=np.int64).tobytes())
    return f"{spec.first_batch}:{h.hexdigest()}"


def _save_unit(path: Path, key: str, r: _UnitResult):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, key=np.array(key), batch=r.batch, tile=r.tile, sums=r.sums, pos=r.pos, shape=r.shape,
                 blocks=r.blocks, info=np.array(json.dumps({"compute_seconds": r.compute_seconds,
                                                            "seconds": r.seconds, "device": r.device,
                                                            "backend": r.backend})))


def _load_unit(path: Path, key: str, spec: _UnitSpec) -> _UnitResult | None:
    """The saved unit if it is complete and belongs to ``spec`` of this run, else None (recompute it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            info = json.loads(str(z["info"]))
            r = _UnitResult(batch=z["batch"].astype(np.int64), tile=z["tile"].astype(np.int64),
                            sums=z["sums"].astype(np.float64), pos=z["pos"].astype(np.int64),
                            shape=z["shape"].astype(np.int64), blocks=z["blocks"].astype(np.float64),
                            compute_seconds=float(info["compute_seconds"]), seconds=float(info["seconds"]),
                            device=str(info["device"]), backend=str(info["backend"]))
    except Exception:  # unreadable, truncated, foreign: recompute
        return None
    want_tiles = [t.index for b in spec.batches for t in b]
    want_batch = [spec.first_batch + i for i, b in enumerate(spec.batches) for _ in b]
    n = len(want_tiles)
    ok = (r.tile.tolist() == want_tiles and r.batch.tolist() == want_batch and r.sums.shape == (n,)
          and r.pos.shape == (n, 2) and r.shape.shape == (n, 2) and bool(np.isfinite(r.sums).all())
          and (r.shape >= 1).all() and r.blocks.shape == (int((r.shape[:, 0] * r.shape[:, 1]).sum()),))
    return r if ok else None


# =========================================================================== the table


def _row(source, total, tiles_counted, tiles_skipped, seconds, mpx_s, status, error="") -> dict:
    return {"source": str(source), "total": total, "tiles_counted": tiles_counted, "tiles_skipped": tiles_skipped,
            "seconds": seconds, "megapixels_per_s": mpx_s, "status": status, "error": error}


_TYPES = {"source": str, "total": float, "tiles_counted": int, "tiles_skipped": int, "seconds": float,
          "megapixels_per_s": float, "status": str, "error": str}


@dataclass
class SlidesResult:
    """Result of ``count_slides``: one row per slide (in the order of ``sources``) and its ``SlideCount``.

    ``rows``: dicts with ``COLUMNS`` (``status`` is ``"ok"``, ``"cached"`` (a
    complete result found in ``out_dir``) or ``"error"``, with ``error`` the
    message; an error row's numbers are None). ``counts``: the ``SlideCount``
    of each row (None for errors).
    """

    rows: list[dict]
    counts: list[SlideCount | None]

    def __len__(self):
        return len(self.rows)

    @property
    def totals(self) -> list[float | None]:
        return [r["total"] for r in self.rows]

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "error"]

    def to_csv(self, path) -> Path:
        """Write the table as CSV (floats written exactly; an error row's numbers are empty)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                            for k in COLUMNS})
        return path

    def to_parquet(self, path) -> Path:
        """Write the table as Parquet (needs pyarrow: ``pip install 'fastcount[distributed]'``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {str: pa.string(), float: pa.float64(), int: pa.int64()}
        schema = pa.schema([(k, types[_TYPES[k]]) for k in COLUMNS])
        table = pa.table({k: [r[k] for r in self.rows] for k in COLUMNS}, schema=schema)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".parquet") as tmp:
            pq.write_table(table, tmp)
        return path

    @staticmethod
    def read_csv(path) -> list[dict]:
        """The rows of a table written by ``to_csv``, typed as in ``rows``."""
        with open(path, newline="") as f:
            return [{k: (None if v == "" and _TYPES[k] is not str else _TYPES[k](v)) for k, v in r.items()}
                    for r in csv.DictReader(f)]

    @staticmethod
    def read_parquet(path) -> list[dict]:
        """The rows of a table written by ``to_parquet``."""
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()


# =========================================================================== client side


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


def expand_sources(items: Iterable[str]) -> list[str]:
    """Paths from command-line items: glob patterns (``*``, ``?``, ``[``, ``**``), files ending in
    ``.txt`` that list one path per line (``#`` comments; relative to the list's folder), or paths."""
    out: list[str] = []
    for item in items:
        item = str(item)
        if any(c in item for c in "*?["):
            hits = sorted(glob.glob(item, recursive=True))
            if not hits:
                raise FileNotFoundError(f"sources: the pattern {item!r} matches no files")
            out.extend(hits)
        elif item.lower().endswith(".txt"):
            base = Path(item).parent
            try:
                lines = Path(item).read_text().splitlines()
            except OSError as e:
                raise FileNotFoundError(f"sources: cannot read the list of paths {item!r}: {e}") from e
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(str(base / line) if not os.path.isabs(line) else line)
        else:
            out.append(item)
    if not out:
        raise ValueError("sources: no slides given")
    return out


def _model_file(model) -> tuple[CountCeption, bytes]:
    """The model (on the CPU, for its geometry) and its weights file as bytes."""
    m = resolve_model(model, "cpu")
    if isinstance(model, (str, os.PathLike)) or model is None:
        return m, Path(model if model is not None else default_weights_path()).read_bytes()
    with tempfile.TemporaryDirectory(prefix="fastcount-model-") as tmp:
        p = save_model(m, Path(tmp) / "model.safetensors", metadata=getattr(m, "metadata", None))
        return m, p.read_bytes()


def _model_fingerprint(m: CountCeption) -> str:
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
    d = {"format": _FORMAT, "path": str(Path(source).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
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


def _unit_ranges(job: SlideJob, split: int) -> list[range]:
    """Consecutive batch ranges of at most ``split`` tiles (at least one batch each)."""
    out, start, n = [], 0, 0
    for i, b in enumerate(job.batches):
        if n and n + len(b) > split:
            out.append(range(start, i))
            start, n = i, 0
        n += len(b)
    if n:
        out.append(range(start, len(job.batches)))
    return out


@dataclass
class _Slide:
    index: int
    source: object
    name: str
    key: str | None = None
    job: SlideJob | None = None
    meta: SimpleNamespace | None = None
    specs: dict = field(default_factory=dict)  # first batch -> _UnitSpec
    results: dict = field(default_factory=dict)  # first batch -> _UnitResult
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
        self.fp = _model_fingerprint(self.model)
        client.register_plugin(_ModelFile(self.fp, data), name=f"fastcount-model-{self.fp[:16]}")
        # The default batch size follows the workers' device (not the client's).
        self.device_type = client.submit(_worker_device, opts["device"], pure=False).result()
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
        for r in _unit_ranges(job, self.split):
            spec = _UnitSpec(source=str(sl.source) if array is None else None, name=reader.name, level=job.level,
                             cell=job.cell, batch_size=job.batch_size, first_batch=r.start,
                             batches=tuple(tuple(job.batches[i]) for i in r), model=self.fp, device=o["device"],
                             backend=o["backend"], precision=o["precision"], reader_threads=o["workers"],
                             queue_depth=o["queue_depth"], pin_memory=o["pin_memory"])
            sl.specs[r.start] = spec
            saved = self._load_unit(sl, spec)
            if saved is not None:
                sl.results[r.start] = saved
                sl.resumed.add(r.start)
                continue
            fut = self.client.submit(_run_unit, spec, array, pure=False,
                                     key=f"fastcount-unit-{sl.name}-{r.start}-{uuid.uuid4().hex[:8]}")
            self.futures[fut] = (sl, spec)
            sl.futures.append(fut)
        sl.plan_seconds = time.perf_counter() - t0
        bar.total += len(job.kept)
        bar.update(sum(sl.specs[b].n_tiles for b in sl.resumed))
        if len(sl.results) == len(sl.specs):
            self.finish(sl)

    def _unit_path(self, sl: _Slide, spec: _UnitSpec) -> Path | None:
        if self.out_dir is None or sl.key is None:
            return None
        return self.out_dir / ".units" / sl.name / f"{spec.first_batch:08d}.npz"

    def _load_unit(self, sl, spec):
        p = self._unit_path(sl, spec)
        return _load_unit(p, _unit_key(sl.key, spec), spec) if p is not None and p.exists() else None

    # ------------------------------------------------------------------ results

    def unit_done(self, sl: _Slide, spec: _UnitSpec, res: _UnitResult):
        sl.results[spec.first_batch] = res
        p = self._unit_path(sl, spec)
        if p is not None:
            _save_unit(p, _unit_key(sl.key, spec), res)
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

    def rows(self, slides: list[_Slide]) -> SlidesResult:
        rows, counts = [], []
        for sl in slides:
            src = sl.source if isinstance(sl.source, (str, os.PathLike)) else f"sources[{sl.index}]"
            if sl.count is None:
                rows.append(_row(src, None, None, None, None, None, "error", sl.error or "not finished"))
                counts.append(None)
                continue
            st = sl.count.stats
            rows.append(_row(src, float(sl.count.total), int(st["tiles_total"] - st["tiles_skipped"]),
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
    o = {"level": 0, "mpp": None, "tile": DEFAULT_TILE, "batch_size": None, "device": "auto",
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
        return _count(client, sources, model, opts, split, out_dir, progress)
    finally:
        if own:
            cluster = client.cluster
            client.close()
            cluster.close()


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


# =========================================================================== command line


def count_from_cli(args, mask) -> int:
    """``fastcount count A B ... --out-dir DIR [--scheduler ADDRESS | --workers N] [--summary T.csv]``."""
    for flag in ("heatmap", "geojson", "checkpoint"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} is for one slide; with several, --out-dir DIR holds each slide's JSON, "
                             f"heatmap and GeoJSON (and what a rerun resumes from)")
    if args.scheduler and args.workers:
        raise ValueError("give --scheduler ADDRESS (an existing cluster) or --workers N (a local one), not both")
    paths = expand_sources(args.path)
    client = Client(args.scheduler) if args.scheduler else local_client(args.workers, device=args.device)
    try:
        res = count_slides(paths, args.weights, client=client, out_dir=args.out_dir, split=args.split,
                           progress=not args.quiet, level=args.level, mpp=args.mpp, mask=mask, tile=args.tile,
                           batch_size=args.batch_size, device=args.device, backend=args.backend,
                           precision=args.precision)
    finally:
        cluster = None if args.scheduler else client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    for r in res.rows:
        if args.json:
            print(json.dumps(r))
        elif r["status"] == "error":
            print(f"{r['source']}: error: {r['error']}")
        else:
            print(f"{r['source']}: {r['total']:.1f} objects ({r['tiles_counted']} tiles counted, "
                  f"{r['tiles_skipped']} skipped as background; {r['seconds']:.1f}s, "
                  f"{r['megapixels_per_s']:.3g} Mpx/s){' [already done]' if r['status'] == 'cached' else ''}")
    n_err = len(res.errors)
    if not args.json:
        print(f"{len(res)} slides: {len(res) - n_err} counted, {n_err} failed")
    if args.summary:
        (res.to_parquet if str(args.summary).lower().endswith(".parquet") else res.to_csv)(args.summary)
    return 1 if n_err else 0
