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
builds and compiles it once per device, keyed by a SHA-1 of its config and tensors.

With ``out_dir`` every finished unit is saved atomically under
``out_dir/.units/<slide>/`` and every finished slide's JSON, heatmap and
GeoJSON are written as it finishes (the JSON last: it marks the slide done).
A rerun skips slides whose results are there and belong to the same run, and
resumes the others from their saved units; a unit or result file that does
not validate is recomputed, never trusted.
"""
from .cli import count_from_cli, expand_sources
from .slides import DEFAULT_SPLIT, count_slides, local_client
from .table import COLUMNS, SlidesResult

__all__ = ["count_slides", "SlidesResult", "local_client", "expand_sources", "count_from_cli", "DEFAULT_SPLIT",
           "COLUMNS"]
