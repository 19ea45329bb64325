"""GPU report for the Triton backend: one command, one table.

    python benchmarks/gpu_report.py                 # on a CUDA machine (H100: ~10 min)
    python benchmarks/gpu_report.py --json out.json # also write the figures
    python benchmarks/gpu_report.py --dry-run       # same code path, tiny, CPU interpreter (CI)

Prints
1. per layer (each conv, each Inception block, the 1x1 head), at a 1024x1024
   tile: time of the fused Triton kernel vs cuDNN (torch conv + BN +
   LeakyReLU modules, channels_last, Inception with torch.cat), at fp32 (TF32
   as torch's cuDNN default) and bf16, with achieved TFLOP/s and % of peak;
2. end to end, 1024x1024 tiles, batch 1..16: megapixels/s (input pixels) for
   eager fp32, eager channels_last + bf16 autocast, torch.compile(max-autotune)
   (channels_last + bf16 autocast) and fastcount triton fp32 / bf16, with
   TFLOP/s and % of the GPU's dense peak at that precision;
3. count difference per 256x256 image, triton (fp32, bf16) vs eager fp32.

The model is the full-size CountCeption with random weights and randomised BN
statistics (timings do not depend on the values). ``--dry-run`` shrinks
everything (width 1/8, r=8, 24x24 tiles, batches 1, 2, one repetition) and
runs the kernels through Triton's interpreter on the CPU; torch.compile uses
the "eager" dynamo backend there (inductor's max-autotune would take minutes
of C++ compilation on a CPU and measure nothing useful).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

if "--dry-run" in sys.argv:
    # Must precede any import of fastcount.kernels: Triton picks interpreter
    # or compiler when a kernel is decorated.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from fastcount import CountCeption  # noqa: E402
from fastcount.inference.triton import build  # noqa: E402
from fastcount.model import Inception  # noqa: E402

# Dense peak TFLOP/s by device-name substring (vendor datasheets, SXM parts).
from fastcount.testing import randomize_bn  # noqa: E402

PEAKS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}




def peaks_for(device: torch.device, override: float | None):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, p in PEAKS.items():
        if key in name:
            return dict(p) if override is None else {k: override for k in p}
    return None if override is None else {k: override for k in ("bf16", "fp16", "tf32", "fp32")}


def timer(device: torch.device, reps: int):
    """fn -> seconds per call. CUDA: triton's do_bench (warm-up, L2 flush,
    median). CPU (dry run): one warm call then ``reps`` timed calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def t(fn):
            fn()  # first call outside the clock: Triton autotuning, torch.compile
            torch.cuda.synchronize()
            return do_bench(fn, warmup=25, rep=max(100, 25 * reps), return_mode="median") / 1e3

        return t

    def t_cpu(fn):
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps

    return t_cpu


def layer_macs(model: CountCeption, h: int, w: int):
    """Per layer of model.layers: (input shape (C, H, W), multiply-adds per image)."""
    out = []
    c = model.in_channels
    for layer in model.layers:
        convs = [layer.branch1.conv, layer.branch3.conv] if isinstance(layer, Inception) else [layer.conv]
        conv0 = convs[0]
        k, p, s = conv0.kernel_size[0], conv0.padding[0], conv0.stride[0]
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        macs = sum(cv.in_channels * cv.out_channels * cv.kernel_size[0] ** 2 for cv in convs) * ho * wo
        out.append(((c, h, w), macs))
        c = sum(cv.out_channels for cv in convs)
        h, w = ho, wo
    return out


def fmt_row(cells, widths):
    return "| " + " | ".join(str(x).rjust(wd) for x, wd in zip(cells, widths)) + " |"


def print_table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n### {title}\n")
    print(fmt_row(header, widths))
    print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    for r in rows:
        print(fmt_row(r, widths))


def pct(tflops, peak):
    return f"{100 * tflops / peak:.1f}%" if peak else "n/a"


def per_layer(model, args, device, t, peaks, results):
    """Fused kernel vs cuDNN module, one layer at a time, at args.layer_batch."""
    size, b = args.size, args.layer_batch
    shapes = layer_macs(model, size, size)
    # model.layers[:-3] map 1:1 onto the backend's launches; the last three are the fused head.
    groups = [[m] for m in model.layers[:-3]] + [list(model.layers[-3:])]
    group_in = [s for s, _ in shapes[:-3]] + [shapes[-3][0]]
    group_macs = [m for _, m in shapes[:-3]] + [sum(m for _, m in shapes[-3:])]
    rows = []
    for prec in args.precisions:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        fast = build(model, precision=prec, device=device)
        peak_key = "tf32" if (prec == "fp32" and fast.tf32) else prec
        peak = peaks[peak_key] if peaks else None
        for (name, fn), mods, (c, h, w), macs in zip(fast.launches(), groups, group_in, group_macs):
            x_nhwc = torch.randn(b, h, w, c, device=device).mul_(3).to(dt)
            ref = copy.deepcopy(torch.nn.Sequential(*mods)).eval().to(device, memory_format=torch.channels_last)
            x_cl = x_nhwc.permute(0, 3, 1, 2)  # NCHW view of NHWC memory == channels_last
            if prec != "fp32":
                ref = ref.to(dt)
            with torch.no_grad():
                t_fused = t(lambda: fn(x_nhwc))
                t_ref = t(lambda: ref(x_cl))
            flops = 2.0 * macs * b
            tf_fused, tf_ref = flops / t_fused / 1e12, flops / t_ref / 1e12
            rows.append([
                prec, name, f"{flops / 1e9:.4g}", f"{t_fused * 1e3:.3f}", f"{t_ref * 1e3:.3f}",
                f"{t_ref / t_fused:.2f}x", f"{tf_fused:.3g}", pct(tf_fused, peak), f"{tf_ref:.3g}",
            ])
            results["layers"].append({
                "precision": prec, "layer": name, "batch": b, "size": size, "gflop": flops / 1e9,
                "fused_ms": t_fused * 1e3, "cudnn_ms": t_ref * 1e3, "fused_tflops": tf_fused, "cudnn_tflops": tf_ref,
            })
            del x_nhwc, ref
    print_table(
        f"Per layer, {size}x{size} tile, batch {b} (fused Triton kernel vs cuDNN conv + BN + LeakyReLU, channels_last)",
        ["prec", "layer", "GFLOP", "fused ms", "cuDNN ms", "speedup", "fused TFLOP/s", "% peak", "cuDNN TFLOP/s"],
        rows,
    )


def make_variants(model, device, precisions=("fp32", "bf16"), compile_mode="max-autotune", dry_run=False):
    """[(name, fn(x) -> count map, peak key)]: the end-to-end contenders.
    ``compile_mode=None`` leaves torch.compile out."""
    eager = model.eval()
    cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)

    def eager_fp32(x):
        with torch.no_grad():
            return eager(x)

    def eager_cl_bf16(x):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return cl(x.contiguous(memory_format=torch.channels_last))

    fp32_key = "tf32" if (torch.backends.cudnn.allow_tf32 and device.type == "cuda") else "fp32"
    variants = [("eager fp32", eager_fp32, fp32_key), ("eager channels_last bf16", eager_cl_bf16, "bf16")]
    if compile_mode is not None:
        # dry run: dynamo only ("eager" backend); inductor's C++ build on a CPU measures nothing useful.
        # dynamic=False: one static graph per batch size, each tuned for its shape (fairest baseline).
        compiled = torch.compile(cl, backend="eager") if dry_run else torch.compile(cl, mode=compile_mode, dynamic=False)

        def compiled_bf16(x):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return compiled(x.contiguous(memory_format=torch.channels_last))

        variants.append((f"torch.compile {compile_mode} bf16", compiled_bf16, "bf16"))
    tri = {p: build(model, precision=p, device=device) for p in precisions}
    for p, be in tri.items():
        variants.append((f"triton {p}", be, "tf32" if (p == "fp32" and be.tf32) else p))
    return variants, tri


def end_to_end(model, args, device, t, peaks, results):
    size = args.size
    macs = sum(m for _, m in layer_macs(model, size, size))
    variants, tri = make_variants(
        model, device, args.precisions, None if args.skip_compile else "max-autotune", args.dry_run
    )

    rows = []
    for b in args.batches:
        x = torch.rand(b, model.in_channels, size, size, device=device) * 255
        base = None
        for name, fn, pk in variants:
            try:
                sec = t(lambda: fn(x))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append([b, name, "OOM", "", "", "", ""])
                continue
            mps = b * size * size / sec / 1e6
            tflops = 2.0 * macs * b / sec / 1e12
            peak = peaks[pk] if peaks else None
            base = base or sec
            rows.append([b, name, f"{sec * 1e3:.2f}", f"{mps:.3g}", f"{tflops:.3g}", pct(tflops, peak), f"{base / sec:.2f}x"])
            results["end_to_end"].append({
                "batch": b, "size": size, "variant": name, "ms": sec * 1e3, "mpix_per_s": mps,
                "tflops": tflops, "peak_key": pk, "peak_tflops": peak,
            })
        del x
    print_table(
        f"End to end, {size}x{size} tiles (megapixels/s of input; speedup vs eager fp32 at the same batch)",
        ["batch", "variant", "ms", "MP/s", "TFLOP/s", "% peak", "vs eager"],
        rows,
    )
    return tri


def count_diffs(model, tri, args, device, results):
    """|count| difference per image, triton vs eager fp32 (TF32 off), 256x256 images."""
    n, side = args.count_images, args.count_size
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, model.in_channels, side, side, generator=g) * 255).to(device)
    r = model.geometry.redundancy
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = model(x).double().sum(dim=(1, 2, 3)) / r
    finally:
        torch.backends.cudnn.allow_tf32 = old
    rows = []
    for p, be in tri.items():
        _, sums = be.count_map_and_sums(x)
        diff = (sums / r - ref).abs()
        rows.append([p + (" (tf32)" if be.tf32 else ""), f"{float(ref.abs().mean()):.3f}", f"{float(diff.mean()):.2e}",
                     f"{float(diff.max()):.2e}", f"{float((diff / ref.abs()).max()):.2e}"])
        results["counts"].append({"precision": p, "tf32": be.tf32, "mean_abs_count": float(ref.abs().mean()),
                                  "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max())})
    print_table(
        f"Count difference vs eager fp32 (TF32 off), {n} images of {side}x{side}, random weights",
        ["triton", "mean |count|", "mean |diff|", "max |diff|", "max rel diff"],
        rows,
    )
    if args.dry_run:
        print("\n(dry run: Triton's interpreter does not emulate bf16/fp16 tl.dot faithfully, so the reduced-precision "
              "rows above measure nothing; the fp32 row is a real correctness check)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny, on the CPU through Triton's interpreter (CI)")
    ap.add_argument("--size", type=int, default=1024, help="tile side in pixels (default 1024)")
    ap.add_argument("--batches", default="1,2,4,8,16", help="comma-separated batch sizes (default 1,2,4,8,16)")
    ap.add_argument("--layer-batch", type=int, default=4, help="batch for the per-layer table (default 4)")
    ap.add_argument("--precisions", default="fp32,bf16", help="triton precisions (default fp32,bf16)")
    ap.add_argument("--reps", type=int, default=10, help="timing repetitions (scales do_bench's budget)")
    ap.add_argument("--count-images", type=int, default=8, help="256x256 images for the count difference")
    ap.add_argument("--skip-compile", action="store_true", help="leave out torch.compile(max-autotune)")
    ap.add_argument("--sections", default="layers,e2e,counts",
                    help="which tables, comma-separated from layers,e2e,counts (default all)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the dense peak (TFLOP/s) for %% of peak")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
        torch.manual_seed(0)
        model = randomize_bn(CountCeption(patch_size=8, width=0.125)).eval()
        args.size, args.layer_batch, args.reps = 24, 1, 1
        args.batches = "1,2"
        args.count_images, args.count_size = 2, 16
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on the CPU")
        device = torch.device("cuda")
        torch.manual_seed(0)
        model = randomize_bn(CountCeption()).eval().to(device)
        args.count_size = 256
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.precisions = [p.strip() for p in args.precisions.split(",")]
    sections = {x.strip() for x in args.sections.split(",")}
    if not sections or not sections <= {"layers", "e2e", "counts"}:
        ap.error(f"--sections must be from layers,e2e,counts, got {args.sections!r}")
    for p in args.precisions:
        if p not in ("fp32", "bf16", "fp16"):
            ap.error(f"--precisions must be from fp32,bf16,fp16, got {p!r}")

    peaks = peaks_for(device, args.peak_tflops)
    t = timer(device, args.reps)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, dry run)"
    import triton

    print(f"# fastcount GPU report: {dev_name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    if peaks:
        print(f"dense peaks used for % of peak (TFLOP/s): {peaks}")
    results = {"device": dev_name, "torch": torch.__version__, "triton": triton.__version__, "dry_run": args.dry_run,
               "layers": [], "end_to_end": [], "counts": []}
    t0 = time.time()
    if "layers" in sections:
        per_layer(model, args, device, t, peaks, results)
    if "e2e" in sections:
        end_to_end(model, args, device, t, peaks, results)
    if "counts" in sections:
        tri = {p: build(model, precision=p, device=device) for p in args.precisions}
        count_diffs(model, tri, args, device, results)
    print(f"\n(total {time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
