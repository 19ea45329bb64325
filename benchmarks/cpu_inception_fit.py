"""Per-block times of the three fp32 Inception methods, and the cost fit the CPU backend uses.

    python benchmarks/cpu_inception_fit.py                    # this CPU's widest ISA
    ONEDNN_MAX_CPU_ISA=AVX2 FASTCOUNT_WINOGRAD_ISA=avx2 python benchmarks/cpu_inception_fit.py

For 17 Inception block shapes (cin -> (a, b): the six blocks of both model widths and
others) at 305x305, median of 5 calls inside the memory pool, it times oneDNN's merged 3x3
conv, oneDNN's split 1x1 + 3x3 + cat, the Winograd F(4x4, 3x3) op on the merged block and
oneDNN's 1x1 + Winograd's 3x3 + cat, prints ns per pixel,
then fits ns/px = coefficients . features per method (least squares on relative error; the
features are ``fastcount.inference.cpu._inception_features``) and shows what the fitted model
would pick per shape against the measured best. The coefficients go into
``_FP32_INCEPTION_NS`` in fastcount/inference/cpu.py.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fastcount.inference.cpu import _Conv, _inception_features, _nhwc
from fastcount.inference.memory import pooled
from fastcount.inference.winograd import WinogradConv

SHAPES = [(64, 16, 16), (32, 16, 32), (16, 112, 48), (160, 64, 32), (96, 40, 40), (80, 32, 96),  # width 1
          (32, 8, 8), (16, 8, 16), (8, 56, 24), (80, 32, 16), (48, 20, 20), (40, 16, 48),  # width 0.5
          (128, 32, 64), (24, 24, 24), (64, 64, 64), (200, 16, 16), (12, 4, 4)]
METHODS = ("merged", "split", "winograd", "split_winograd")


def _runners(cin, a, b):
    w = torch.randn(a + b, cin, 3, 3) / (9 * cin) ** 0.5
    w[:a] = 0
    w[:a, :, 1, 1] = torch.randn(a, cin) / cin ** 0.5  # the 1x1 branch: centre tap only
    bias = torch.randn(a + b)
    merged = _Conv(w, bias, 1, 0.01, torch.float32)
    c1 = _Conv(w[:a, :, 1:2, 1:2].contiguous(), bias[:a], 0, 0.01, torch.float32)
    c3 = _Conv(w[a:], bias[a:], 1, 0.01, torch.float32)
    w3 = WinogradConv(w[a:], bias[a:], 0.01)
    return {"merged": merged, "split": lambda x: torch.cat([c1(x), c3(x)], 1), "winograd": WinogradConv(w, bias, 0.01),
            "split_winograd": lambda x: torch.cat([c1(x), w3(x)], 1)}


def measure(side: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode(), pooled(True):
        for cin, a, b in SHAPES:
            x = _nhwc(torch.randn(1, cin, side, side))
            row = {"shape": (cin, a, b)}
            for name, run in _runners(cin, a, b).items():
                run(x)
                ts = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    run(x)
                    ts.append(time.perf_counter() - t)
                row[name] = statistics.median(ts) * 1e9 / side / side
            rows.append(row)
            print(f"{cin:4d} -> ({a:3d}, {b:3d})  " + "  ".join(f"{m} {row[m]:7.1f}" for m in METHODS), flush=True)
    return rows


def fit(rows: list[dict]) -> dict:
    coefs = {}
    for m in METHODS:
        X = np.array([_inception_features(m, *r["shape"]) for r in rows], float)
        y = np.array([r[m] for r in rows])
        c, *_ = np.linalg.lstsq(X / y[:, None], np.ones(len(y)), rcond=None)
        coefs[m] = c
        print(f"{m:9s} coefficients {np.array2string(c, precision=4)}  max rel err {np.max(np.abs(X @ c / y - 1)):.2f}")
    lost = best_total = 0.0
    for r in rows:
        pred = {m: float(np.dot(_inception_features(m, *r["shape"]), coefs[m])) for m in METHODS}
        pick, best = min(pred, key=pred.get), min(METHODS, key=lambda m: r[m])
        lost += r[pick] - r[best]
        best_total += r[best]
        print(f"  {r['shape']}: model picks {pick:8s} ({r[pick]:.1f} ns/px), best {best:8s} ({r[best]:.1f})")
    print(f"picked total / best total: {(best_total + lost) / best_total:.3f}")
    return coefs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=305)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.side}x{args.side}, ns per pixel")
    fit(measure(args.side, args.rounds))


if __name__ == "__main__":
    main()
