"""Units of work: how a slide's batches are cut, and the unit files a rerun resumes from.

A unit file holds one finished unit's per-tile sums and density blocks with a
key (the slide's run key and the unit's tiles). It is written atomically and
read back only if it validates against the unit it claims to be.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..files import atomic_path
from ..slide.job import SlideJob
from .worker import UnitResult, UnitSpec

__all__ = ["FORMAT", "unit_key", "save_unit", "load_unit", "unit_ranges"]

FORMAT = 1  # of unit files and run keys


def unit_key(slide_key: str, spec: UnitSpec) -> str:
    h = hashlib.sha1(slide_key.encode())
    for b in spec.batches:
        h.update(np.array([t.index for t in b] + [-1], dtype=np.int64).tobytes())
    return f"{spec.first_batch}:{h.hexdigest()}"


def save_unit(path: Path, key: str, r: UnitResult):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, key=np.array(key), batch=r.batch, tile=r.tile, sums=r.sums, pos=r.pos, shape=r.shape,
                 blocks=r.blocks, info=np.array(json.dumps({"compute_seconds": r.compute_seconds,
                                                            "seconds": r.seconds, "device": r.device,
                                                            "backend": r.backend})))


def load_unit(path: Path, key: str, spec: UnitSpec) -> UnitResult | None:
    """The saved unit if it is complete and belongs to ``spec`` of this run, else None (recompute it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            info = json.loads(str(z["info"]))
            r = UnitResult(batch=z["batch"].astype(np.int64), tile=z["tile"].astype(np.int64),
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




def unit_ranges(job: SlideJob, split: int) -> list[range]:
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
