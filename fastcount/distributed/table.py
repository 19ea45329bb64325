"""``SlidesResult``: one row per slide, with CSV and Parquet exports."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_path
from ..slide.result import SlideCount

__all__ = ["COLUMNS", "SlidesResult", "row"]

# Columns of the per-slide table (CSV / Parquet).
COLUMNS = ("source", "total", "tiles_counted", "tiles_skipped", "seconds", "megapixels_per_s", "status", "error")


def row(source, total, tiles_counted, tiles_skipped, seconds, mpx_s, status, error="") -> dict:
    return {"source": str(source), "total": total, "tiles_counted": tiles_counted, "tiles_skipped": tiles_skipped,
            "seconds": seconds, "megapixels_per_s": mpx_s, "status": status, "error": error}


TYPES = {"source": str, "total": float, "tiles_counted": int, "tiles_skipped": int, "seconds": float,
          "megapixels_per_s": float, "status": str, "error": str}


@dataclass
class SlidesResult:
    """Result of ``count_slides``: one row per slide (in the order of ``sources``) and its ``SlideCount``.

    ``rows``: dicts with ``COLUMNS`` (``status`` is ``"ok"``, ``"cached"`` (a
    complete result found in ``out_dir``) or ``"error"``, with ``error`` the
    message; an error row's numbers are None). ``counts``: the ``SlideCount``
    of each row (None for errors).
    """

    rows: list[dict]
    counts: list[SlideCount | None]

    def __len__(self):
        return len(self.rows)

    @property
    def totals(self) -> list[float | None]:
        return [r["total"] for r in self.rows]

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "error"]

    def to_csv(self, path) -> Path:
        """Write the table as CSV (floats written exactly; an error row's numbers are empty)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                            for k in COLUMNS})
        return path

    def to_parquet(self, path) -> Path:
        """Write the table as Parquet (needs pyarrow: ``pip install 'fastcount[distributed]'``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {str: pa.string(), float: pa.float64(), int: pa.int64()}
        schema = pa.schema([(k, types[TYPES[k]]) for k in COLUMNS])
        table = pa.table({k: [r[k] for r in self.rows] for k in COLUMNS}, schema=schema)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".parquet") as tmp:
            pq.write_table(table, tmp)
        return path

    @staticmethod
    def read_csv(path) -> list[dict]:
        """The rows of a table written by ``to_csv``, typed as in ``rows``."""
        with open(path, newline="") as f:
            return [{k: (None if v == "" and TYPES[k] is not str else TYPES[k](v)) for k, v in r.items()}
                    for r in csv.DictReader(f)]

    @staticmethod
    def read_parquet(path) -> list[dict]:
        """The rows of a table written by ``to_parquet``."""
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
