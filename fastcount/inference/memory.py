"""Memory reuse for the CPU fast path: a scoped caching CPU allocator.

A forward pass allocates and frees activations of tens of MB per layer. glibc
serves blocks over 32 MB with fresh ``mmap`` calls, so every pass pays a page
fault and kernel zeroing for every 4 KiB page of every large activation: on the
2-core development machine that was 20-30% of the fp32 fast path's time.

Inside ``with pooled():`` the process's CPU allocator is fastcount's pool
(``csrc/cpu/memory_pool.cpp``): blocks of 1 MiB and more are kept when freed and
handed to the next allocation they fit (best fit, at most 1.5x the request);
smaller ones go to PyTorch's default allocator. ``CPUBackend`` calls run inside it (``reuse_memory=True``).

Bounds: when the outermost scope ends, blocks that none of the last 4 scopes
reused are freed (sizes of an earlier input shape), then the oldest idle blocks
until at most twice the largest working set of those scopes is kept idle. Idle
bytes never exceed a limit (default: a quarter of physical memory;
:func:`set_limit`), and :func:`release` frees them all.
``FASTCOUNT_MEMORY_POOL=0`` turns the pool off process-wide. Without the
compiled extension the scope is a no-op.

While a scope is open, every thread's CPU tensors of >= 1 MiB come from the pool
(the allocator is process-wide); their memory is returned to the pool when
they are freed, whenever that is.
"""
from __future__ import annotations

import contextlib
import os

from .._ext import _C, has_compiled_ops

__all__ = ["pooled", "available", "release", "set_limit", "stats"]


def available() -> bool:
    """True when the compiled pool exists and ``FASTCOUNT_MEMORY_POOL`` is not ``0``."""
    return has_compiled_ops() and os.environ.get("FASTCOUNT_MEMORY_POOL", "1") != "0"


@contextlib.contextmanager
def pooled(enabled: bool = True):
    """Run the block with fastcount's caching CPU allocator (re-entrant, thread-safe)."""
    if not (enabled and available()):
        yield
        return
    _C.pool_enter()
    try:
        yield
    finally:
        _C.pool_exit()


def release() -> None:
    """Free every idle cached block (tensors still alive are unaffected)."""
    if has_compiled_ops():
        _C.pool_release()


def set_limit(nbytes: int) -> None:
    """Cap the idle cached bytes; blocks freed beyond the cap go back to the OS."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    if has_compiled_ops():
        _C.pool_set_limit(nbytes)


def stats() -> dict:
    """Pool counters: idle_bytes, live_bytes, hits, misses, depth (open scopes), limit.

    All zero without the compiled extension.
    """
    if has_compiled_ops():
        return _C.pool_stats()
    return {"idle_bytes": 0, "live_bytes": 0, "hits": 0, "misses": 0, "depth": 0, "limit": 0}
