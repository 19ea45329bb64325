"""Resume files of ``count_slide``: which batches are finished, their per-tile sums and density.

A checkpoint is tied to one run by a fingerprint (source, level, tile plan,
batching, model weights, backend, precision); a file from another run, or one
that is damaged, is refused and left untouched. Saves are atomic renames, so
a kill at any moment leaves the previous save intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from ..files import atomic_path

__all__ = ["Checkpoint", "fingerprint"]


def fingerprint(reader, level, shape, tile, batch_size, cell, model, backend, precision, kept) -> str:
    """The run description a checkpoint must match: JSON text (``kept``: indices of the tiles counted)."""
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


class Checkpoint:
    """The resume file at ``path`` of the run described by ``fingerprint``, saved at most every ``every`` s."""

    def __init__(self, path, fingerprint: str, every: float):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.every = every
        self._last_save = time.perf_counter()

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, done: np.ndarray, sums: np.ndarray, density: np.ndarray):
        with atomic_path(self.path, ".npz") as tmp:
            np.savez(tmp, fingerprint=np.array(self.fingerprint), done=done, sums=sums, density=density)
        self._last_save = time.perf_counter()

    def is_due(self) -> bool:
        return time.perf_counter() - self._last_save >= self.every

    def load(self, n_batches: int, n_tiles: int, density_shape):
        """``(done, sums, density)`` of the saved run; ValueError if the file is unreadable,
        belongs to another run or does not fit this one's shapes."""
        path = self.path
        try:
            with np.load(path, allow_pickle=False) as z:
                old_fp, done, sums, density = str(z["fingerprint"]), z["done"], z["sums"], z["density"]
            a = json.loads(old_fp)
            if not isinstance(a, dict):
                raise ValueError("its fingerprint is not a run description")
        except Exception as e:
            raise ValueError(f"checkpoint {path} is not a readable fastcount checkpoint: {e}") from e
        if old_fp != self.fingerprint:
            b = json.loads(self.fingerprint)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"checkpoint {path} belongs to a different run (differs in: {', '.join(diff)}); "
                             f"delete it or pass another checkpoint path")
        if done.shape != (n_batches,) or sums.shape != (n_tiles,) or density.shape != tuple(density_shape):
            raise ValueError(f"checkpoint {path} has inconsistent array shapes")
        return done.astype(bool), sums.astype(np.float64), density.astype(np.float64)
