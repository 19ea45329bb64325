"""``count_slide``: exact tiled counting of images of any size.

The count map is partitioned into output tiles (``plan.py``); each tile reads
its input with the halo from ``fastcount.geometry``, runs the backend, keeps
its own crop, and adds it (float64) to a per-tile sum and to the density grid
(``accumulator.py``). The total is the ``math.fsum`` of the per-tile sums in
tile order, divided by the redundancy, so it equals
``redundant_count(model(whole image))`` up to float rounding and does not
depend on how the work was scheduled.

The path of one call: the job (``job.py``: level, tile plan, mask, batches)
-> ``prefetch`` (reader threads) -> upload -> backend -> tile consumers and the
``Accumulator`` -> ``SlideCount``. Worker threads read and decode the next
batches while the backend computes; at most ``queue_depth`` batches are being
read ahead, plus the one uploaded and the one computing, so host memory is
bounded by tile x batch x (queue depth + 2) (plus the model's activations on
one batch), whatever the slide size.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

from ..api import resolve_model
from ..devices import resolve_device
from ..inference import DEFAULT_BACKEND
from ..inference import compile as compile_backend
from ..inference.memory import release as release_pool
from ..localise import LocateParams
from ..model import CountCeption
from ..system import peak_rss_mb, reset_peak_rss
from .accumulator import Accumulator, TileSum, reduce_tile
from .checkpoint import Checkpoint, fingerprint
from .compute import tile_maps
from .job import SlideJob, plan_job
from .plan import Tile, check_tile, default_tile
from .points import SlidePoints
from .prefetch import prefetch
from .readers import SlideReader, open_reader
from .result import SlideCount

__all__ = ["count_slide", "run_batches", "TileConsumer"]

# Called with each tile and its float64 count-map crop (on the compute device) as it is computed.
# (tile, its float64 crop of the count map, its input pixels (C, h, w) as read)
TileConsumer = Callable[[Tile, torch.Tensor, torch.Tensor], None]


@torch.inference_mode()
def count_slide(source, model=None, *, level=0, mpp=None, tile=None, batch_size=None, device="auto",
                backend=DEFAULT_BACKEND, precision="fp32", mask="auto", workers=None, progress=True, cell=None,
                checkpoint=None, checkpoint_every: float = 30.0, queue_depth=None, pin_memory=None,
                points=False) -> SlideCount:
    """Count objects in a slide or image of any size, tile by tile, exactly.

    Args:
        source: a path (SVS, NDPI, OME-/pyramidal/tiled TIFF through
            tifffile; DICOM through OpenSlide; PNG/JPEG; a ``.zarr`` folder), a
            numpy array (HxW or HxWxC), a zarr array or a dask array. Pixels
            are converted by the one pixel rule of ``fastcount.pixels``.
        model: a ``CountCeption``, a weights path, or None for the default weights.
        level: pyramid level to count at. ``mpp``: instead of ``level``, the
            target microns per pixel (the level closest to it is used).
        tile: largest output tile side in full-resolution count-map pixels
            (>= 16 and a multiple of the model's stride). The plan evens tiles
            out (no thin slivers at the far edge); each tile reads at most
            ``tile + r + 12 + stride`` input rows. None: ``DEFAULT_CPU_TILE`` (512)
            on the CPU, ``DEFAULT_TILE`` (1024) on a GPU (``slide/plan.py``).
        batch_size: tiles per backend call (tiles of equal input shape are
            batched together); default 1 on CPU, about 4 Mpx per batch on GPU.
        device, backend, precision: see ``fastcount.inference.compile``.
        mask: ``None`` (count every tile), ``"auto"`` (Otsu foreground mask on
            a low-resolution level, brightfield or fluorescence), or a 2-D
            boolean array at any resolution with the image's aspect ratio.
            Tiles whose whole input box is masked out count 0 and are never read.
            The thumbnail comes from a coarser pyramid level; a source without
            one is read once in bounded strips (numpy arrays are subsampled).
        workers: reader threads (default min(4, CPUs)).
        progress: show a tqdm bar (tiles/s, ETA).
        cell: density block side in count-map pixels (default r/s, coarser on huge slides).
        checkpoint: path of a resume file. Finished batches are saved every
            ``checkpoint_every`` seconds, on Ctrl-C and at the end; a rerun with
            the same arguments continues from it and gives the identical total.
        queue_depth: batches read ahead (default workers + 1).
        pin_memory: pinned host buffers for GPU copies (default: on for CUDA).
        points: also locate the objects (``fastcount.locate`` on the tiles' count
            map, exactly the whole-image points): ``SlideCount.points``. Not with
            ``checkpoint`` (a resume file keeps tile sums, not count maps).

    Returns:
        ``SlideCount`` with ``.total``, ``.density``, ``.stats`` and exports.
    """
    t_start = time.perf_counter()
    rss_reset = reset_peak_rss()
    dev = resolve_device(device)
    tile = default_tile(dev) if tile is None else tile
    _check_run_args(batch_size, workers, queue_depth, checkpoint_every, mask)
    if points and checkpoint is not None:
        raise ValueError("points=True cannot be combined with checkpoint: a resume file keeps tile sums, "
                         "not the count map the points come from")
    model = _model_on(resolve_model(model, device=dev), dev, tile)
    was_training = model.training
    reader = open_reader(source, name="source")
    try:
        job = plan_job(reader, model.geometry, level=level, mpp=mpp, tile=tile, cell=cell, mask=mask,
                       batch_size=batch_size, device=dev)
        fn = compile_backend(model, backend, precision, dev)
        backend_name = getattr(fn, "name", backend)
        acc = Accumulator(len(job.plan.tiles), len(job.batches), job.density_shape, dev)
        ckpt = None
        if checkpoint is not None:
            fp = fingerprint(reader, job.level, job.shape, tile, job.batch_size, job.cell, model, backend_name,
                             precision, [t.index for t in job.kept])
            ckpt = Checkpoint(checkpoint, fp, checkpoint_every)
            if ckpt.exists():
                acc.restore(*ckpt.load(len(job.batches), len(job.plan.tiles), job.density_shape))
        resumed = sum(len(b) for b, d in zip(job.batches, acc.done) if d)
        n_workers = workers or min(4, os.cpu_count() or 1)
        depth = queue_depth or n_workers + 1
        pin = (dev.type == "cuda") if pin_memory is None else bool(pin_memory)
        todo = acc.pending()
        located = SlidePoints(job.shape, model.geometry, job.kept, LocateParams.of(model)) if points else None
        with tqdm(total=sum(len(job.batches[i]) for i in todo), unit="tile", disable=not progress,
                  desc=f"count {_short_name(reader)}", dynamic_ncols=True, leave=False) as bar:
            reads = prefetch(reader, job.level, job.batches, todo, workers=n_workers, depth=depth, pin=pin,
                             on_read=job.thumbnail_filler.add if job.thumbnail_filler is not None else None)
            t_compute = run_batches(job, fn, acc, reads, dev, checkpoint=ckpt,
                                    consumers=[located] if located is not None else (),
                                    on_batch=lambda bi: bar.update(len(job.batches[bi])))
        density = acc.state()[2] / model.geometry.redundancy
        stats = _stats(job, acc, t_start=t_start, t_compute=t_compute, rss_reset=rss_reset, resumed=resumed,
                       geometry=model.geometry, backend=backend_name, precision=precision, device=dev,
                       workers=n_workers, depth=depth)
        res = _result(job, reader, model.geometry, acc.total(job.kept, model.geometry.redundancy), density, stats)
        if located is not None:
            res.set_points(located.finish(res.total))
            res.stats["locate_seconds"] = located.seconds
        return res
    finally:
        model.train(was_training)
        release_pool()  # the cpu backend's idle tile activations: the caller gets that memory back
        if reader is not source:
            reader.close()


def run_batches(job: SlideJob, fn, acc: Accumulator, reads: Iterator[tuple[int, torch.Tensor]],
                dev: torch.device, *, checkpoint: Checkpoint | None = None, consumers: Sequence[TileConsumer] = (),
                on_batch: Callable[[int], None] | None = None) -> float:
    """Count the batches ``reads`` yields into ``acc``; returns the seconds spent computing.

    Batch i + 1 is uploaded before batch i is computed, so on CUDA the copy
    overlaps the compute. ``reads`` is closed at the end, also on an error; a
    batch being added when Ctrl-C comes is finished first, then ``checkpoint``
    (if any) is saved, so it holds exactly the finished batches.
    """
    copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    t_compute = 0.0
    try:
        with closing(reads):
            try:
                pending = None
                for bi, x_host in reads:
                    x_dev = _upload(x_host, dev, copy_stream)
                    del x_host
                    if pending is not None:
                        t_compute += _count_batch(fn, job, acc, *pending, consumers)
                        if on_batch is not None:
                            on_batch(pending[0])
                    pending = (bi, x_dev)
                    if checkpoint is not None and checkpoint.is_due():
                        checkpoint.save(*acc.state())
                if pending is not None:
                    t_compute += _count_batch(fn, job, acc, *pending, consumers)
                    if on_batch is not None:
                        on_batch(pending[0])
                    pending = None
            finally:
                acc.commit()
    finally:
        if checkpoint is not None:
            checkpoint.save(*acc.state())
    return t_compute


def _count_batch(fn, job: SlideJob, acc: Accumulator, bi: int, x_dev: torch.Tensor,
                 consumers: Iterable[TileConsumer]) -> float:
    """Run batch ``bi`` through the backend and add its tiles to ``acc``; returns the compute seconds."""
    t0 = time.perf_counter()
    x = x_dev.permute(0, 3, 1, 2).to(torch.float32).contiguous()
    results: list[TileSum] = []
    pieces = tile_maps(fn, x, job.batches[bi], job.shape, job.plan.geometry)
    for k, (t, piece) in enumerate(zip(job.batches[bi], pieces)):
        for consume in consumers:
            consume(t, piece, x[k])
        results.append(reduce_tile(t, piece, job.cell))
    seconds = time.perf_counter() - t0
    acc.add(bi, results)
    return seconds


def _upload(x: torch.Tensor, dev: torch.device, copy_stream) -> torch.Tensor:
    """``x`` on ``dev``; on CUDA through ``copy_stream``, ordered before the compute that reads it."""
    if copy_stream is None:
        return x.to(dev)
    with torch.cuda.stream(copy_stream):
        y = x.to(dev, non_blocking=True)
    torch.cuda.current_stream(dev).wait_stream(copy_stream)
    y.record_stream(torch.cuda.current_stream(dev))
    return y


# --------------------------------------------------------------------------- arguments


def _check_positive(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be a positive int or None, got {v!r}")


def _check_run_args(batch_size, workers, queue_depth, checkpoint_every, mask):
    _check_positive("batch_size", batch_size)
    _check_positive("workers", workers)
    _check_positive("queue_depth", queue_depth)
    if not (isinstance(checkpoint_every, (int, float)) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be a non-negative number of seconds, got {checkpoint_every!r}")
    if isinstance(mask, str) and mask != "auto":
        raise ValueError(f"mask must be None, 'auto' or a 2-D boolean array, got {mask!r}")


def _model_on(model, dev: torch.device, tile) -> CountCeption:
    """``model`` checked for slides and ``tile``, on ``dev`` (a copy when it is elsewhere: the
    caller's model is never moved behind their back)."""
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, a weights path or None, got {type(model).__name__}")
    if model.in_channels != 3:
        raise ValueError(f"count_slide reads RGB slides; the model expects {model.in_channels} input channels")
    check_tile(tile, model.geometry.stride)
    if next(model.parameters()).device != dev:
        model = copy.deepcopy(model).to(dev)
    return model


# --------------------------------------------------------------------------- result


def _short_name(reader: SlideReader) -> str:
    return Path(reader.name).name if getattr(reader, "path", None) else "array"


def _stats(job: SlideJob, acc: Accumulator, *, t_start, t_compute, rss_reset, resumed, geometry, backend,
           precision, device, workers, depth) -> dict:
    H, W = job.shape
    n_tiles = len(job.plan.tiles)
    seconds = time.perf_counter() - t_start
    # The count map also covers the r-pixel margin past the image: count image pixels only.
    mpx = acc.area_added * ((H * W) / (geometry.full_size(H) * geometry.full_size(W))) / 1e6
    return {
        "tiles_total": n_tiles,
        "tiles_processed": acc.tiles_added,
        "tiles_skipped": n_tiles - len(job.kept),
        "tiles_resumed": resumed,
        "batches": len(job.batches),
        "batch_size": job.batch_size,
        "tile": job.plan.tile,
        "seconds": seconds,
        "compute_seconds": t_compute,
        "megapixels": mpx,
        "megapixels_per_s": mpx / seconds if seconds > 0 else 0.0,
        "slide_megapixels": H * W / 1e6,
        "slide_megapixels_per_s": H * W / 1e6 / seconds if seconds > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_scope": "this call" if rss_reset else "process lifetime",
        "mask": job.mask_info,
        "level": job.level,
        "backend": backend,
        "precision": precision,
        "device": str(device),
        "workers": workers,
        "queue_depth": depth,
    }


def _result(job: SlideJob, reader: SlideReader, g, total: float, density, stats: dict) -> SlideCount:
    return SlideCount(
        total=total, density=density, cell=job.cell, stats=stats, source=reader.name, level=job.level,
        shape=job.shape, downsample=float(reader.downsamples[job.level]), level0_shape=tuple(reader.level_shapes[0]),
        patch_size=g.r, stride=g.stride, mpp=reader.mpp, thumbnail=job.thumbnail,
    )
