"""``fastcount count A B ... --out-dir DIR [--scheduler ADDRESS | --workers N] [--summary T.csv]``."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from pathlib import Path

from distributed import Client

from .slides import count_slides, local_client

__all__ = ["expand_sources", "count_from_cli"]


def expand_sources(items: Iterable[str]) -> list[str]:
    """Paths from command-line items: glob patterns (``*``, ``?``, ``[``, ``**``), files ending in
    ``.txt`` that list one path per line (``#`` comments; relative to the list's folder), or paths."""
    out: list[str] = []
    for item in items:
        item = str(item)
        if any(c in item for c in "*?["):
            hits = sorted(glob.glob(item, recursive=True))
            if not hits:
                raise FileNotFoundError(f"sources: the pattern {item!r} matches no files")
            out.extend(hits)
        elif item.lower().endswith(".txt"):
            base = Path(item).parent
            try:
                lines = Path(item).read_text().splitlines()
            except OSError as e:
                raise FileNotFoundError(f"sources: cannot read the list of paths {item!r}: {e}") from e
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(str(base / line) if not os.path.isabs(line) else line)
        else:
            out.append(item)
    if not out:
        raise ValueError("sources: no slides given")
    return out



def count_from_cli(args, mask) -> int:
    """``fastcount count A B ... --out-dir DIR [--scheduler ADDRESS | --workers N] [--summary T.csv]``."""
    for flag in ("heatmap", "geojson", "checkpoint", "points"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag} is for one slide; with several, --out-dir DIR holds each slide's JSON, "
                             f"heatmap and GeoJSON (and what a rerun resumes from)")
    if args.scheduler and args.workers:
        raise ValueError("give --scheduler ADDRESS (an existing cluster) or --workers N (a local one), not both")
    paths = expand_sources(args.path)
    try:
        client = Client(args.scheduler, timeout=30) if args.scheduler else local_client(args.workers,
                                                                                        device=args.device)
    except OSError as e:
        raise ValueError(f"--scheduler {args.scheduler}: cannot reach the Dask scheduler ({e})") from e
    try:
        res = count_slides(paths, args.weights, client=client, out_dir=args.out_dir, split=args.split,
                           progress=not args.quiet, level=args.level, mpp=args.mpp, mask=mask, tile=args.tile,
                           batch_size=args.batch_size, device=args.device, backend=args.backend,
                           precision=args.precision)
    finally:
        cluster = None if args.scheduler else client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    for r in res.rows:
        if args.json:
            print(json.dumps(r))
        elif r["status"] == "error":
            print(f"{r['source']}: error: {r['error']}")
        else:
            print(f"{r['source']}: {r['total']:.1f} objects ({r['tiles_counted']} tiles counted, "
                  f"{r['tiles_skipped']} skipped as background; {r['seconds']:.1f}s, "
                  f"{r['megapixels_per_s']:.3g} Mpx/s){' [already done]' if r['status'] == 'cached' else ''}")
    n_err = len(res.errors)
    if not args.json:
        print(f"{len(res)} slides: {len(res) - n_err} counted, {n_err} failed")
    if args.summary:
        (res.to_parquet if str(args.summary).lower().endswith(".parquet") else res.to_csv)(args.summary)
    return 1 if n_err else 0
