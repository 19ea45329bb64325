"""Time and peak memory of the CPU fast path with and without its memory pool.

    python benchmarks/cpu_memory.py --size 1024 --calls 4 [--no-pool] [--precision bf16]

Run once per setting (peak RSS is per process): prints each call's seconds, the
process's peak RSS and the pool's idle bytes afterwards. Full-width model, random init.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from fastcount.inference import memory
from fastcount.inference.cpu import build
from fastcount.model import CountCeption


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-pool", action="store_true", help="CPUBackend(reuse_memory=False)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = CountCeption().eval()
    x = torch.rand(1, 3, args.size, args.size) * 255
    fast = build(model, args.precision, reuse_memory=not args.no_pool)
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        fast(x)
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{args.size}x{args.size} {args.precision} pool={'off' if args.no_pool else 'on'}: "
          f"calls {', '.join(f'{t:.2f}' for t in times)} s; peak RSS {rss:.0f} MiB; "
          f"pool idle {memory.stats()['idle_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
