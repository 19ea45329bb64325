"""The worker side of ``count_slides``: the model kept per worker, and the task every unit runs.

A unit's task gets a ``UnitSpec`` (the slide's path and its tiles, no
pixels, no model) and returns a ``UnitResult`` (each tile's float64 sum and
density blocks). The model arrives once per worker as a weights file through
the ``ModelFile`` plugin and is built and compiled on the worker's own device
the first time a unit needs it.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from ..devices import resolve_device
from ..inference import compile as compile_backend
from ..io import load_model
from ..slide.accumulator import TileSum
from ..slide.engine import run_batches
from ..slide.job import SlideJob
from ..slide.plan import Tile, TilePlan
from ..slide.prefetch import prefetch
from ..slide.readers import open_reader

__all__ = ["ModelFile", "UnitSpec", "UnitResult", "TileSumRecorder", "run_unit", "worker_device",
           "set_test_unit_delay"]

_MODEL_FILES: dict[str, bytes] = {}  # model fingerprint -> safetensors bytes (from the plugin)
_BACKENDS: dict[tuple, tuple] = {}  # (fingerprint, device, backend, precision) -> (fn, name, lock)
_CACHE_LOCK = threading.Lock()
_BUILDS = 0  # models this worker has built (each is then kept for every task)
_TEST_UNIT_DELAY = 0.0  # seconds each unit waits before returning (tests only: makes kill timing certain)


class ModelFile(WorkerPlugin):
    """Puts the model's weights file (bytes) on every worker, including ones that join or restart later."""

    def __init__(self, fingerprint: str, data: bytes):
        self.fingerprint, self.data = fingerprint, data

    def setup(self, worker=None):
        _MODEL_FILES[self.fingerprint] = self.data


def set_test_unit_delay(seconds: float):
    global _TEST_UNIT_DELAY
    _TEST_UNIT_DELAY = float(seconds)


def _worker_backend(fp: str, dev: torch.device, backend: str, precision: str):
    """The compiled model of fingerprint ``fp`` on ``dev``: built once per worker and kept."""
    global _BUILDS
    key = (fp, str(dev), backend, precision)
    with _CACHE_LOCK:
        if key not in _BACKENDS:
            if fp not in _MODEL_FILES:
                raise RuntimeError(f"model {fp[:12]} was not registered on this worker")
            _BUILDS += 1
            with tempfile.TemporaryDirectory(prefix="fastcount-model-") as tmp:
                path = Path(tmp) / "model.safetensors"
                path.write_bytes(_MODEL_FILES[fp])
                model = load_model(path, device=dev)
            fn = compile_backend(model, backend, precision, dev)
            # One unit at a time per compiled model: backends keep per-call buffers.
            _BACKENDS[key] = (fn, getattr(fn, "name", backend), threading.Lock(), model.geometry)
        return _BACKENDS[key]


def worker_device(device) -> str:
    return resolve_device(device).type


@dataclass(frozen=True)
class UnitSpec:
    """One unit of work: batches ``first_batch ..`` of a slide's job (their tiles travel, the pixels do not)."""

    source: str | None  # path; None when the array comes as the task's second argument
    name: str
    level: int
    tile: int  # the slide plan's tile side and grid (the engine crops each tile's map by them)
    grid: tuple
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
class UnitResult:
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


class TileSumRecorder:
    """Takes the place of the ``Accumulator`` in ``run_batches``: keeps each tile's sums on the host."""

    def __init__(self, first_batch: int):
        self.first_batch = first_batch
        self.results: list[tuple[int, TileSum]] = []

    def add(self, batch: int, results: list[TileSum]):
        self.results.extend((self.first_batch + batch, r) for r in results)

    def commit(self):
        pass

    def unit_result(self, **info) -> UnitResult:
        rs = self.results
        blocks = [r.blocks.detach().cpu().numpy().ravel() for _, r in rs]
        return UnitResult(
            batch=np.array([b for b, _ in rs], dtype=np.int64),
            tile=np.array([r.tile.index for _, r in rs], dtype=np.int64),
            sums=np.array([r.total for _, r in rs], dtype=np.float64),
            pos=np.array([(r.block_row, r.block_col) for _, r in rs], dtype=np.int64).reshape(-1, 2),
            shape=np.array([tuple(r.blocks.shape) for _, r in rs], dtype=np.int64).reshape(-1, 2),
            blocks=np.concatenate(blocks) if blocks else np.zeros(0), **info)


def run_unit(spec: UnitSpec, array=None) -> UnitResult:
    """Count one unit on this worker (the task every unit runs)."""
    t0 = time.perf_counter()
    dev = resolve_device(spec.device)
    fn, backend_name, lock, geometry = _worker_backend(spec.model, dev, spec.backend, spec.precision)
    source = spec.source if array is None else array
    reader = open_reader(source, name=spec.name)
    try:
        # The unit's own job: its batches only, numbered from 0 (the recorder adds first_batch back).
        shape = tuple(reader.level_shapes[spec.level])
        plan = TilePlan(*shape, spec.tile, geometry, [t for b in spec.batches for t in b], tuple(spec.grid))
        job = SlideJob(level=spec.level, shape=shape, plan=plan, kept=[],
                       batches=[list(b) for b in spec.batches], batch_size=spec.batch_size, cell=spec.cell,
                       thumbnail=None, thumbnail_filler=None, mask_info={})
        n_threads = spec.reader_threads or min(4, os.cpu_count() or 1)
        depth = spec.queue_depth or n_threads + 1
        pin = (dev.type == "cuda") if spec.pin_memory is None else bool(spec.pin_memory)
        rec = TileSumRecorder(spec.first_batch)
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
