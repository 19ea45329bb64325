"""Reading batches ahead: worker threads read and decode while the backend computes.

``prefetch`` yields ``(batch index, NHWC host tensor)`` in the order asked for,
with at most ``depth`` batches being read ahead, so host memory is bounded by
tile x batch x depth whatever the slide size. Closing the generator (the
engine does, also on Ctrl-C) cancels the reads not started and waits for the
running ones.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .plan import Tile
from .readers import SlideReader

__all__ = ["prefetch"]


def _read_batch(reader: SlideReader, level: int, tiles: list[Tile], pin: bool,
               on_read: Callable[[int, int, np.ndarray], None] | None = None) -> torch.Tensor:
    """The input boxes of ``tiles`` (all of one shape) as one (n, h, w, 3) tensor; ``on_read(y0, x0,
    region)`` sees each region as it is read."""
    h, w = tiles[0].in_shape
    buf = np.empty((len(tiles), h, w, 3), dtype=reader.dtype)
    for k, t in enumerate(tiles):
        buf[k] = reader.read_region(level, t.iy0, t.ix0, h, w)
        if on_read is not None:
            on_read(t.iy0, t.ix0, buf[k])
    x = torch.from_numpy(buf)
    return x.pin_memory() if pin else x


def prefetch(reader: SlideReader, level: int, batches: Sequence[list[Tile]], order: Sequence[int], *,
             workers: int, depth: int, pin: bool,
             on_read: Callable[[int, int, np.ndarray], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, batch i read)`` for each ``i`` of ``order``, read ahead by ``workers`` threads."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastcount-read")
    inflight: deque = deque()
    todo = iter(order)

    def submit(i: int):
        inflight.append((i, pool.submit(_read_batch, reader, level, batches[i], pin, on_read)))

    try:
        for i in todo:
            submit(i)
            if len(inflight) >= depth:
                break
        while inflight:
            i, fut = inflight.popleft()
            x = fut.result()
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
            yield i, x
            del x
    finally:
        for _, fut in inflight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
