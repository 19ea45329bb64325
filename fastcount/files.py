"""Writing files so that a reader never sees half of one."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``; when the block succeeds it replaces ``path`` in one step.

    An interrupted or failed write leaves the previous file untouched and no
    temporary behind. ``suffix`` ends the temporary's name, for writers that
    choose the format from it (``".png"``, ``".npz"``).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
