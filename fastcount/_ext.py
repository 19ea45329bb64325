"""The one place that loads the compiled extension ``fastcount._C`` (``csrc/``).

Importing it registers the ``torch.ops.fastcount.*`` ops (and the CPU memory
pool's entry points on the module itself); their fake kernels live in
``fastcount.ops``, the module the extension names for them. If the extension is missing or fails to load
(e.g. built against another torch), ``_C`` is None and every caller falls back
to its pure-PyTorch path.
"""
from __future__ import annotations

import torch

__all__ = ["_C", "has_compiled_ops", "compiled_ops_error"]

try:
    from . import _C
except (ImportError, OSError) as _e:  # pragma: no cover - depends on the build
    _C = None
    _C_ERROR: "Exception | None" = _e
else:
    _C_ERROR = None


def has_compiled_ops() -> bool:
    """True when the C++/CUDA extension (fastcount._C) is loaded and its ops registered."""
    return _C is not None and hasattr(torch.ops, "fastcount") and hasattr(torch.ops.fastcount, "make_targets")


def compiled_ops_error() -> "Exception | None":
    """Why fastcount._C could not be loaded (None when it loaded)."""
    return _C_ERROR

