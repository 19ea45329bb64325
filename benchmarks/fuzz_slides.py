"""Fuzz the slide readers: damaged files must count or raise a named error, never crash or hang.

    nice python benchmarks/fuzz_slides.py --cases 1000 --seed 0 --timeout 60 --json /tmp/fuzz.json

Every fixture format (PNG, tiled TIFF, SVS, DICOM WSI from ../shared/fixtures/slides,
plus a generated JPEG, 16-bit PNG, pyramidal SubIFD TIFF and JPEG-compressed OME-TIFF)
is mutated by bit flips, header byte damage or truncation at a random offset, and each
mutant is counted with ``count_slide`` (tiny random model, 256 px tiles), with ``mask=None``
(every tile read) or ``mask="auto"`` (the tissue mask reads a coarser level first), drawn per
case. The first two rounds are the undamaged files (no mask, then "auto"), which must count.
A case's time grows with the pixels the file claims: a damaged size field can make a 96x96
JPEG decode (gray-filled) as 44128x96, counted like any image at ~0.3 Mpx/s for this model
on one core. (A TIFF claiming tiles it does not store is refused at open.)

Cases run in a persistent worker process (importing torch costs 1-2 s), restarted when it
dies or runs over the timeout. Outcomes:
- counted: a finite total;
- named: ``SlideReadError``, or a ValueError/TypeError raised by fastcount's own code;
- crash: any other exception, a non-finite total, or the worker dying (signal or exit);
- hang: no answer within ``--timeout`` seconds.
Exit status 1 when any case crashed or hung.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "fixtures" / "slides"
MUTATIONS = ("bitflip", "header", "truncate")
MEMORY_LIMIT = 4 << 30  # a damaged header may claim a gigapixel image; fail the allocation, not the machine


# --------------------------------------------------------------------------- corpus


def make_corpus(folder: Path) -> dict[str, list[Path]]:
    """Format name -> the files of one sample (the first is the one mutated; the rest sit beside it)."""
    import numpy as np
    import tifffile
    from PIL import Image

    from fastcount.data.synth import cell_image, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    corpus = {
        "png": [SLIDES / "boxes.png"],
        "tiff": [SLIDES / "boxes.tiff"],
        "svs": [SLIDES / "small.svs"],
        "dicom": [SLIDES / "boxes_0.dcm", SLIDES / "boxes_1.dcm"],
    }
    img, _ = cell_image(96, seed=1)
    Image.fromarray(img).save(folder / "cells.jpg", quality=90)
    Image.fromarray((img[:, :, 1].astype(np.uint16) * 257)).save(folder / "cells16.png")
    tifffile.imwrite(folder / "cells.ome.tif", img, ome=True, tile=(32, 32), compression="jpeg",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    write_synthetic_slide(folder / "pyramid.tif", 192, seed=2, tile=64, min_level_side=64, tissue_fraction=0.3)
    corpus.update({"jpeg": [folder / "cells.jpg"], "png16": [folder / "cells16.png"],
                   "ome-tiff": [folder / "cells.ome.tif"], "pyramid-tiff": [folder / "pyramid.tif"]})
    return corpus


def mutate(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """A damaged copy of ``data`` and a short description of the damage."""
    b = bytearray(data)
    if kind == "none":
        return bytes(b), "undamaged"
    if kind == "bitflip":
        bits = [rng.randrange(len(b) * 8) for _ in range(rng.randint(1, 16))]
        for bit in bits:
            b[bit // 8] ^= 1 << (bit % 8)
        return bytes(b), f"flipped bits {sorted(bits)}"
    if kind == "header":
        n = min(len(b), 256)  # magic numbers, IFD offsets, image sizes, PNG IHDR, DICOM preamble
        where = sorted(rng.sample(range(n), rng.randint(1, min(8, n))))
        for i in where:
            b[i] = rng.randrange(256)
        return bytes(b), f"random bytes at {where}"
    if kind == "truncate":
        cut = rng.randrange(len(b))
        return bytes(b[:cut]), f"truncated to {cut} of {len(b)} bytes"
    raise ValueError(f"unknown mutation {kind!r}")


def make_cases(corpus: dict[str, list[Path]], n: int, seed: int) -> list[dict]:
    """``n`` cases cycling over the formats; the first two rounds are the undamaged files."""
    rng = random.Random(seed)
    names = sorted(corpus)
    cases = []
    for i in range(n):
        fmt = names[i % len(names)]
        if i < 2 * len(names):
            kind, mask = "none", None if i < len(names) else "auto"
        else:
            kind, mask = rng.choice(MUTATIONS), rng.choice((None, "auto"))
        cases.append({"case": i, "format": fmt, "mutation": kind, "mask": mask, "seed": rng.randrange(2**32)})
    return cases


def write_case(case: dict, corpus, folder: Path) -> Path:
    """Write the case's files into its own folder; return the path to count."""
    d = folder / f"case{case['case']}"
    d.mkdir(parents=True)
    first, *rest = corpus[case["format"]]
    data, case["damage"] = mutate(first.read_bytes(), case["mutation"], random.Random(case["seed"]))
    (d / first.name).write_bytes(data)
    for p in rest:
        shutil.copy(p, d / p.name)
    return d / first.name


# --------------------------------------------------------------------------- worker (child process)


def _ours(exc: BaseException) -> bool:
    """Was ``exc`` raised by fastcount's own code (a checked, documented error)?"""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and Path(last).resolve().is_relative_to(ROOT / "fastcount")


def classify(fn) -> dict:
    """Run ``fn()`` (returns a ``SlideCount``) and classify what happened."""
    import math

    from fastcount.slide.readers import SlideReadError

    try:
        res = fn()
    except SlideReadError as e:
        return {"outcome": "named", "error": f"SlideReadError: {e}"[:300]}
    except (ValueError, TypeError) as e:
        if str(e) and _ours(e):
            return {"outcome": "named", "error": f"{type(e).__name__}: {e}"[:300]}
        return {"outcome": "crash", "error": traceback.format_exc()[-1500:]}
    except Exception:
        return {"outcome": "crash", "error": traceback.format_exc()[-1500:]}
    if not math.isfinite(res.total):
        return {"outcome": "crash", "error": f"non-finite total {res.total}"}
    return {"outcome": "counted", "total": res.total, "shape": list(res.shape)}


def worker():
    """Read cases ({"path", "mask"}) from stdin, one per line; answer one JSON line each."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C libraries that print must not corrupt the answers
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass
    import torch

    import fastcount

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = fastcount.CountCeption(width=0.0625).eval()
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        res = classify(lambda: fastcount.count_slide(case["path"], model, tile=256, mask=case["mask"],
                                                     progress=False, backend="eager", workers=1))
        out.write(json.dumps(res) + "\n")


# --------------------------------------------------------------------------- parent


class Worker:
    """A persistent child running ``worker()``; ``ask`` answers a case or reports crash/hang."""

    def __init__(self, log: Path, start_timeout: float = 180.0):
        self.log = log
        self.err = open(log, "ab")
        self.p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1, cwd=ROOT)
        ready = self._answer(start_timeout)
        if not (isinstance(ready, dict) and ready.get("ready")):
            self.kill()
            raise RuntimeError(f"fuzz worker did not start ({ready}); see {log}")

    def _answer(self, timeout):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            return "hang"
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            return "died"
        return json.loads(line)

    def ask(self, path: Path, timeout: float, mask=None) -> dict:
        try:
            self.p.stdin.write(json.dumps({"path": str(path), "mask": mask}) + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        ans = self._answer(timeout)
        if ans == "hang":
            self.kill()
            return {"outcome": "hang", "error": f"no answer in {timeout} s"}
        if ans == "died":
            rc = self.p.returncode
            why = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            return {"outcome": "crash", "error": f"worker {why}: {self._log_tail()}"}
        return ans

    def _log_tail(self) -> str:
        self.err.flush()
        return self.log.read_bytes()[-1000:].decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.err.close()


def run(n_cases: int, seed: int = 0, timeout: float = 60.0, progress=None) -> dict:
    """Run ``n_cases`` fuzz cases; returns {"cases": [...], "summary": {...}, "seconds": s}."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastcount-fuzz-") as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp / "corpus")
        cases = make_cases(corpus, n_cases, seed)
        w = None
        try:
            for case in cases:
                if w is None or not w.alive():
                    w = Worker(tmp / "worker.log")
                path = write_case(case, corpus, tmp / "cases")
                t = time.perf_counter()
                case.update(w.ask(path, timeout, case["mask"]))
                case["seconds"] = round(time.perf_counter() - t, 3)
                shutil.rmtree(path.parent, ignore_errors=True)
                if progress:
                    progress(case)
        finally:
            if w is not None:
                w.close()
    summary = Counter(c["outcome"] for c in cases)
    by_format = {f: dict(Counter(c["outcome"] for c in cases if c["format"] == f)) for f in sorted(corpus)}
    return {"cases": cases, "summary": {k: summary.get(k, 0) for k in ("counted", "named", "crash", "hang")},
            "by_format": by_format, "seconds": time.perf_counter() - t0,
            "slowest": [{k: c.get(k) for k in ("case", "format", "damage", "mask", "outcome", "shape", "seconds")}
                        for c in sorted(cases, key=lambda c: -c["seconds"])[:5]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--json", default=None, help="write every case and the summary here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0

    def show(c):
        if c["outcome"] in ("crash", "hang"):
            print(f"case {c['case']} {c['format']} {c['mutation']} ({c['damage']}, mask {c['mask']}): "
                  f"{c['outcome'].upper()}\n"
                  f"  {c['error']}", flush=True)
        elif (c["case"] + 1) % 100 == 0:
            print(f"{c['case'] + 1} cases done", flush=True)

    r = run(args.cases, args.seed, args.timeout, progress=show)
    print(f"{args.cases} cases in {r['seconds']:.0f} s: {json.dumps(r['summary'])}")
    for fmt, outcomes in r["by_format"].items():
        print(f"  {fmt}: {json.dumps(outcomes)}")
    print("slowest cases:")
    for c in r["slowest"]:
        print(f"  {json.dumps(c)}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 1 if r["summary"]["crash"] or r["summary"]["hang"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
