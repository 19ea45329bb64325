"""``count_slide``: exact tiled counting of images of any size.

The count map is partitioned into output tiles (``plan.py``); each tile reads
its input with the halo from ``fastcount.geometry``, runs the backend, keeps
its own crop, and adds it (float64) to a per-tile sum and to the density grid.
The total is the ``math.fsum`` of the per-tile sums in tile order, divided by
the redundancy, so it equals ``redundant_count(model(whole image))`` up to
float rounding and does not depend on how the work was scheduled.

Worker threads read and decode the next batches while the backend computes;
at most ``queue_depth`` batches are being read ahead, plus the one uploaded and
the one computing, so host memory is bounded by tile x batch x (queue depth + 2)
(plus the model's activations on one batch), whatever the slide size.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..api import resolve_model
from ..inference import compile as compile_backend
from ..model import CountCeption
from .mask import SlideMask, auto_mask, prepare_mask
from .plan import Tile, check_tile, plan_tiles
from ..pixels import to_intensities
from .readers import ArrayReader, SlideReader, open_reader
from .result import SlideCount
from ..devices import resolve_device
from ..files import atomic_path

__all__ = ["count_slide", "read_thumbnail", "peak_rss_mb", "reset_peak_rss"]

THUMB_SIDE = 1024
# A whole level is read for the thumbnail only below this many pixels.
STRIP_PIXELS = 1 << 24
MIN_THUMB = 256


# --------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last reset (process lifetime where reset is unsupported)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- thumbnails


def thumbnail_level(reader: SlideReader, level: int, max_side: int = THUMB_SIDE) -> int:
    """Level to build ``level``'s thumbnail from. A strictly coarser level is preferred (the
    counted level is then read only for kept tiles): the coarsest with >= max_side pixels,
    else the finest coarser one if it has MIN_THUMB pixels; else ``level`` itself."""
    H, W = reader.level_shapes[level]
    ds0 = reader.downsamples[level]
    coarser = sorted((i for i in range(reader.level_count) if reader.downsamples[i] > ds0 * 1.01),
                     key=lambda i: -max(reader.level_shapes[i]))
    src = level
    if coarser and max(reader.level_shapes[coarser[0]]) >= min(MIN_THUMB, max(H, W)):
        src = coarser[0]
        for i in coarser:
            if max(reader.level_shapes[i]) >= max_side:
                src = i
    return src


def read_thumbnail(reader: SlideReader, level: int = 0, max_side: int = THUMB_SIDE) -> np.ndarray:
    """A low-resolution (h, w, 3) uint8 view of ``level``'s full extent, read from the
    coarsest pyramid level that still has ``max_side`` pixels, in bounded strips."""
    H, W = reader.level_shapes[level]
    if isinstance(reader, ArrayReader) and reader.level_count == 1:
        f = max(1, math.ceil(max(H, W) / max_side))
        a = reader.array[::f, ::f]
        if hasattr(a, "compute"):
            a = a.compute()
        return _as_u8(to_intensities(np.asarray(a), reader.name))
    src = thumbnail_level(reader, level, max_side)
    h, w = reader.level_shapes[src]
    f = max(1, math.ceil(max(h, w) / max_side))
    th, tw = math.ceil(h / f), math.ceil(w / f)
    out = np.zeros((th, tw, 3), dtype=np.float32)
    rows = max(f, (STRIP_PIXELS // max(w, 1)) // f * f)
    for y in range(0, h, rows):
        hh = min(rows, h - y)
        strip = reader.read_region(src, y, 0, hh, w).astype(np.float32)
        # Block means (edge blocks padded by replication so they are not darkened).
        ph, pw = -hh % f, -w % f
        if ph or pw:
            strip = np.pad(strip, ((0, ph), (0, pw), (0, 0)), mode="edge")
        b = strip.reshape(strip.shape[0] // f, f, strip.shape[1] // f, f, 3).mean(axis=(1, 3))
        out[y // f : y // f + b.shape[0]] = b
    return np.round(out).clip(0, 255).astype(np.uint8)


def _as_u8(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.uint8 else np.round(a).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- argument checks


def _pick_level(reader: SlideReader, level, mpp) -> int:
    if mpp is not None:
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not mpp > 0:
            raise ValueError(f"mpp must be a positive number (target microns per pixel), got {mpp!r}")
        if reader.mpp is None:
            raise ValueError(f"mpp={mpp} was requested but {reader.name} does not record its microns per pixel; "
                             f"pass level= instead (levels: {reader.level_shapes})")
        mpps = [reader.mpp * d for d in reader.downsamples]
        return int(np.argmin([abs(math.log(m / mpp)) for m in mpps]))
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise TypeError(f"level must be an int pyramid level (or use mpp=...), got {type(level).__name__}")
    if not 0 <= level < reader.level_count:
        raise ValueError(f"level must be in 0..{reader.level_count - 1} for {reader.name} "
                         f"(levels {reader.level_shapes}), got {level}")
    return int(level)


def _default_cell(g, out_shape) -> int:
    """Density block side (count-map px): r/s (one window), coarser for huge slides so
    the grid stays <= 2048 per side."""
    cell = max(1, g.r // g.stride)
    while max(out_shape) / cell > 2048:
        cell *= 2
    return cell


def _block_sum(piece: torch.Tensor, gy0: int, gx0: int, cell: int):
    """Sum ``piece`` (placed at global count-map row gy0, col gx0) into density blocks:
    returns (first block row, first block col, block sums)."""
    h, w = piece.shape
    dev = piece.device
    ry = (torch.arange(gy0, gy0 + h, device=dev) // cell) - gy0 // cell
    rx = (torch.arange(gx0, gx0 + w, device=dev) // cell) - gx0 // cell
    rows = torch.zeros((int(ry[-1]) + 1, w), dtype=piece.dtype, device=dev).index_add_(0, ry, piece)
    blk = torch.zeros((rows.shape[0], int(rx[-1]) + 1), dtype=piece.dtype, device=dev).index_add_(1, rx, rows)
    return gy0 // cell, gx0 // cell, blk


def _check_positive(name, v, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


# --------------------------------------------------------------------------- checkpoint


def _fingerprint(reader, level, shape, tile, batch_size, cell, model, backend, precision, kept) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    src = {"name": reader.name}
    p = getattr(reader, "path", None)
    if p is not None:
        st = os.stat(p)
        src.update(size=st.st_size, mtime=int(st.st_mtime))
    d = {"source": src, "level": level, "shape": list(shape), "tile": tile, "batch_size": batch_size,
         "cell": cell, "model": h.hexdigest(), "config": model.config, "backend": backend, "precision": precision,
         "tiles": hashlib.sha1(np.asarray(kept, dtype=np.int64).tobytes()).hexdigest()}
    return json.dumps(d, sort_keys=True)


def _save_checkpoint(path: Path, fp: str, done: np.ndarray, sums: np.ndarray, density: np.ndarray):
    # Written to a temporary name and renamed: an interrupt mid-write leaves the old file intact.
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, fingerprint=np.array(fp), done=done, sums=sums, density=density)


def _load_checkpoint(path: Path, fp: str, n_batches: int, n_tiles: int, dshape):
    try:
        with np.load(path, allow_pickle=False) as z:
            old_fp, done, sums, density = str(z["fingerprint"]), z["done"], z["sums"], z["density"]
        a = json.loads(old_fp)
        if not isinstance(a, dict):
            raise ValueError("its fingerprint is not a run description")
    except Exception as e:
        raise ValueError(f"checkpoint {path} is not a readable fastcount checkpoint: {e}") from e
    if old_fp != fp:
        b = json.loads(fp)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"checkpoint {path} belongs to a different run (differs in: {', '.join(diff)}); "
                         f"delete it or pass another checkpoint path")
    if done.shape != (n_batches,) or sums.shape != (n_tiles,) or density.shape != tuple(dshape):
        raise ValueError(f"checkpoint {path} has inconsistent array shapes")
    return done.astype(bool), sums.astype(np.float64), density.astype(np.float64)


# --------------------------------------------------------------------------- engine


def _fill_thumbnail(thumb: np.ndarray, f: int, t: Tile, a: np.ndarray):
    """Sample a tile's input into the thumbnail (pixel (i, j) = image pixel (i f, j f))."""
    oy, ox = (-t.iy0) % f, (-t.ix0) % f
    sub = a[oy::f, ox::f]
    ty, tx = (t.iy0 + oy) // f, (t.ix0 + ox) // f
    thumb[ty : ty + sub.shape[0], tx : tx + sub.shape[1]] = _as_u8(sub)


def _read_batch(reader: SlideReader, level: int, tiles: list[Tile], pin: bool, thumb=None) -> torch.Tensor:
    h, w = tiles[0].in_shape
    buf = np.empty((len(tiles), h, w, 3), dtype=reader.dtype)
    for k, t in enumerate(tiles):
        buf[k] = reader.read_region(level, t.iy0, t.ix0, h, w)
        if thumb is not None:
            _fill_thumbnail(thumb[0], thumb[1], t, buf[k])
    x = torch.from_numpy(buf)
    return x.pin_memory() if pin else x


@torch.inference_mode()
def count_slide(source, model=None, *, level=0, mpp=None, tile=1024, batch_size=None, device="auto",
                backend="auto", precision="fp32", mask="auto", workers=None, progress=True, cell=None,
                checkpoint=None, checkpoint_every: float = 30.0, queue_depth=None, pin_memory=None) -> SlideCount:
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
            ``tile + r + 12 + stride`` input rows.
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

    Returns:
        ``SlideCount`` with ``.total``, ``.density``, ``.stats`` and exports.
    """
    t_start = time.perf_counter()
    rss_reset = reset_peak_rss()
    dev = resolve_device(device)
    _check_positive("batch_size", batch_size)
    _check_positive("workers", workers)
    _check_positive("queue_depth", queue_depth)
    if not (isinstance(checkpoint_every, (int, float)) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be a non-negative number of seconds, got {checkpoint_every!r}")
    if isinstance(mask, str) and mask != "auto":
        raise ValueError(f"mask must be None, 'auto' or a 2-D boolean array, got {mask!r}")

    model = resolve_model(model, device=dev)
    if not isinstance(model, CountCeption):
        raise TypeError(f"model must be a CountCeption, a weights path or None, got {type(model).__name__}")
    if model.in_channels != 3:
        raise ValueError(f"count_slide reads RGB slides; the model expects {model.in_channels} input channels")
    g = model.geometry
    check_tile(tile, g.stride)
    if next(model.parameters()).device != dev:
        import copy

        model = copy.deepcopy(model).to(dev)  # never move the caller's model behind their back
    was_training = model.training

    reader = open_reader(source, name="source")
    try:
        return _run(reader, model, lvl_args=(level, mpp), tile=tile, batch_size=batch_size, dev=dev,
                    backend=backend, precision=precision, mask=mask, workers=workers, progress=progress,
                    cell=cell, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                    queue_depth=queue_depth, pin_memory=pin_memory, t_start=t_start, rss_reset=rss_reset)
    finally:
        model.train(was_training)
        if reader is not source:
            reader.close()


def _run(reader, model, *, lvl_args, tile, batch_size, dev, backend, precision, mask, workers, progress, cell,
         checkpoint, checkpoint_every, queue_depth, pin_memory, t_start, rss_reset):
    g = model.geometry
    level, mpp = lvl_args
    lvl = _pick_level(reader, level, mpp)
    H, W = reader.level_shapes[lvl]
    plan = plan_tiles(H, W, tile, g)
    out_shape = plan.out_shape
    if cell is None:
        cell = _default_cell(g, out_shape)
    elif isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f"cell must be a positive int (density block side in count-map pixels), got {cell!r}")

    # ---- mask (thumbnail first: it is also the heatmap's background)
    thumb_from_tiles = None
    if (isinstance(mask, str) or isinstance(reader, ArrayReader) or thumbnail_level(reader, lvl) != lvl):
        thumb = read_thumbnail(reader, lvl)
    else:
        # No coarser level and no auto mask: build the heatmap's thumbnail from the tiles as
        # they are read, rather than reading the whole level one extra time.
        f = max(1, math.ceil(max(H, W) / THUMB_SIDE))
        thumb = np.zeros((math.ceil(H / f), math.ceil(W / f), 3), dtype=np.uint8)
        thumb_from_tiles = (thumb, f)
    mask_info = {"kind": "none"}
    if mask is None:
        smask = None
    elif isinstance(mask, str):
        f = max(H / thumb.shape[0], W / thumb.shape[1])
        m, mask_info = auto_mask(thumb, dilate=2 + math.ceil(g.r / f))
        smask = SlideMask(m, H, W)
    else:
        smask = SlideMask(prepare_mask(mask, H, W), H, W)
        mask_info = {"kind": "user"}
    if smask is not None:
        mask_info["fraction"] = smask.fraction
    kept = [t for t in plan.tiles if smask is None or smask.any(t.iy0, t.iy1, t.ix0, t.ix1)]

    # ---- batches: tiles of equal input shape together, in raster order of their first tile
    if batch_size is None:
        batch_size = 1 if dev.type == "cpu" else max(1, (2048 // tile) ** 2)
    groups: dict[tuple, list[Tile]] = {}
    for t in kept:
        groups.setdefault(t.in_shape, []).append(t)
    batches = [grp[i : i + batch_size] for grp in groups.values() for i in range(0, len(grp), batch_size)]
    batches.sort(key=lambda b: b[0].index)

    fn = compile_backend(model, backend, precision, dev)
    backend_name = getattr(fn, "name", backend)
    R = g.redundancy
    dshape = (math.ceil(out_shape[0] / cell), math.ceil(out_shape[1] / cell))
    density = np.zeros(dshape, dtype=np.float64)
    sums = np.full(len(plan.tiles), np.nan)
    done = np.zeros(len(batches), dtype=bool)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    fp = None
    if ckpt is not None:
        fp = _fingerprint(reader, lvl, (H, W), tile, batch_size, cell, model, backend_name, precision,
                          [t.index for t in kept])
        if ckpt.exists():
            done, sums, density = _load_checkpoint(ckpt, fp, len(batches), len(plan.tiles), dshape)
    resumed = sum(len(b) for b, d in zip(batches, done) if d)
    todo = [i for i in range(len(batches)) if not done[i]]

    n_workers = workers or min(4, os.cpu_count() or 1)
    depth = queue_depth or n_workers + 1
    pin = (dev.type == "cuda") if pin_memory is None else bool(pin_memory)
    copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    dens_t = torch.zeros(dshape, dtype=torch.float64, device=dev)

    from tqdm import tqdm

    bar = tqdm(total=sum(len(batches[i]) for i in todo), unit="tile", disable=not progress,
               desc=f"count {Path(reader.name).name if getattr(reader, 'path', None) else 'array'}", dynamic_ncols=True,
               leave=False)
    t_compute = 0.0
    processed = 0
    area = 0
    last_save = time.perf_counter()

    def upload(x: torch.Tensor) -> torch.Tensor:
        if copy_stream is None:
            return x.to(dev)
        with torch.cuda.stream(copy_stream):
            y = x.to(dev, non_blocking=True)
        torch.cuda.current_stream(dev).wait_stream(copy_stream)
        y.record_stream(torch.cuda.current_stream(dev))
        return y

    staged = None  # (batch index, per-tile results, how many applied): a batch being committed

    def compute(bi: int, x_dev: torch.Tensor):
        nonlocal t_compute, staged
        t0 = time.perf_counter()
        x = x_dev.permute(0, 3, 1, 2).to(torch.float32).contiguous()
        out = fn(x)
        res = []
        for k, t in enumerate(batches[bi]):
            piece = out[k, 0, t.cy0 : t.cy1, t.cx0 : t.cx1].to(torch.float64)
            s = float(piece.sum())
            by, bx, blk = _block_sum(piece, t.gy0, t.gx0, cell)
            res.append((t, s, by, bx, blk))
        t_compute += time.perf_counter() - t0
        staged = [bi, res, 0]
        commit()

    def commit():
        # Applying a computed batch is finished even after Ctrl-C (see finally), so the
        # saved state always holds whole batches: no tile is ever counted twice on resume.
        nonlocal staged, processed, area
        bi, res, k0 = staged
        for k in range(k0, len(res)):
            t, s, by, bx, blk = res[k]
            sums[t.index] = s
            dens_t[by : by + blk.shape[0], bx : bx + blk.shape[1]] += blk
            area += (t.oy1 - t.oy0) * (t.ox1 - t.ox0)
            staged[2] = k + 1
        done[bi] = True
        processed += len(res)
        staged = None

    def flush_density():
        nonlocal dens_t
        density[...] += dens_t.cpu().numpy()
        dens_t.zero_()

    was_interrupted = False
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="fastcount-read")
    inflight: deque = deque()
    it = iter(todo)
    try:
        for bi in it:
            inflight.append((bi, pool.submit(_read_batch, reader, lvl, batches[bi], pin, thumb_from_tiles)))
            if len(inflight) >= depth:
                break
        pending = None
        while inflight:
            bi, fut = inflight.popleft()
            x_host = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                inflight.append((nxt, pool.submit(_read_batch, reader, lvl, batches[nxt], pin, thumb_from_tiles)))
            x_dev = upload(x_host)
            del x_host
            if pending is not None:
                compute(*pending)
                bar.update(len(batches[pending[0]]))
            pending = (bi, x_dev)
            if ckpt is not None and time.perf_counter() - last_save >= checkpoint_every:
                flush_density()
                _save_checkpoint(ckpt, fp, done, sums, density)
                last_save = time.perf_counter()
        if pending is not None:
            compute(*pending)
            bar.update(len(batches[pending[0]]))
            pending = None
    except BaseException:
        was_interrupted = True
        raise
    finally:
        if staged is not None:
            commit()
        for _, fut in inflight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if ckpt is not None:
            # Only finished batches are marked done; their sums and density are complete.
            flush_density()
            _save_checkpoint(ckpt, fp, done, sums, density)
        elif not was_interrupted:
            flush_density()

    kept_idx = [t.index for t in kept]
    total = math.fsum(float(sums[i]) for i in kept_idx) / R
    density /= R
    seconds = time.perf_counter() - t_start
    frac = (H * W) / ((H + g.r) * (W + g.r))
    mpx = area * frac / 1e6
    stats = {
        "tiles_total": len(plan.tiles),
        "tiles_processed": processed,
        "tiles_skipped": len(plan.tiles) - len(kept),
        "tiles_resumed": resumed,
        "batches": len(batches),
        "batch_size": batch_size,
        "tile": tile,
        "seconds": seconds,
        "compute_seconds": t_compute,
        "megapixels": mpx,
        "megapixels_per_s": mpx / seconds if seconds > 0 else 0.0,
        "slide_megapixels": H * W / 1e6,
        "slide_megapixels_per_s": H * W / 1e6 / seconds if seconds > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_scope": "this call" if rss_reset else "process lifetime",
        "mask": mask_info,
        "level": lvl,
        "backend": backend_name,
        "precision": precision,
        "device": str(dev),
        "workers": n_workers,
        "queue_depth": depth,
    }
    return SlideCount(
        total=total, density=density, cell=cell, stats=stats, source=reader.name, level=lvl, shape=(H, W),
        downsample=float(reader.downsamples[lvl]), level0_shape=tuple(reader.level_shapes[0]), patch_size=g.r,
        stride=g.stride, mpp=reader.mpp, thumbnail=thumb,
    )
