"""Per-layer time of the CPU fast path next to eager PyTorch, interleaved in one process.

    python benchmarks/cpu_layers.py --size 256 --rounds 3 [--fft-sizes] [--mix] [--no-pool] [--bf16-fft]
    python benchmarks/cpu_layers.py --count-error 20 [--weights model.safetensors]

For every layer of CountCeption it times, on the same input, the eager module
(NCHW fp32, BN and activation as separate ops) and the fastcount cpu op
(fp32 and bf16), alternating rounds so that load from other processes hits
both alike; it prints the median of each and the ratio. With ``--fft-sizes``
it also times both large convs at every candidate FFT size next to the cost
model's choice. With ``--mix`` it also times both large convs with the
compiled channel-mixing op (``fastcount::spectral_mix``) against the
transpose + batched-GEMM fallback, interleaved. ``--count-error N`` instead reports, over the last N VGG cell
images (the reference test set), |count(cpu fp32 / bf16) - count(eager fp32)|
per 256x256 image for the given weights (default: a random-init model).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastcount.inference.cpu import CPUBackend, _Large, bf16_supported
from fastcount.inference.fft import fft_cost, smooth_sizes
from fastcount.inference.memory import pooled
from fastcount.inference.plan import fold
from fastcount.model import CountCeption


def _time(fn, x):
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def _layer_inputs(model, x):
    """Eager inputs to each top-level layer (NCHW fp32)."""
    ins = []
    with torch.inference_mode():
        for layer in model.layers:
            ins.append(x)
            x = layer(x)
    return ins


def _names(model):
    out = []
    for i, layer in enumerate(model.layers):
        kind = type(layer).__name__
        if kind == "ConvBNAct":
            k = layer.conv.kernel_size[0]
            kind = f"conv{k}x{k}"
        out.append(f"{i + 1:2d} {kind}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--fft-sizes", action="store_true", help="also sweep the FFT size of the large convs")
    ap.add_argument("--mix", action="store_true", help="also time the large convs with the compiled mixing op vs the GEMM fallback")
    ap.add_argument("--no-pool", action="store_true",
                    help="time the fast ops without fastcount's memory pool (fresh mmaps per large tensor)")
    ap.add_argument("--bf16-fft", action="store_true", help="also time bf16 with the large convs by FFT")
    ap.add_argument("--count-error", type=int, default=0, metavar="N", help="count error on N VGG test images")
    ap.add_argument("--weights", default=None, help="safetensors weights for --count-error")
    args = ap.parse_args(argv)
    if args.count_error:
        return count_error(args.count_error, args.weights)

    torch.manual_seed(0)
    model = CountCeption(width=args.width).eval()
    x = torch.rand(1, 3, args.size, args.size) * 255
    plan = fold(model, torch.float64).to("cpu")
    backends = {"fp32": CPUBackend(plan, "fp32")}
    if bf16_supported():
        backends["bf16"] = CPUBackend(plan, "bf16")
        if args.bf16_fft:
            backends["bf16fft"] = CPUBackend(plan, "bf16", large="fft")
    ins = _layer_inputs(model, x)
    names = _names(model)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, input {args.size}x{args.size}, "
          f"rounds {args.rounds} (median); fp32 choice {backends['fp32'].choice}")

    # Each fast op sees its input in the layout and dtype the pipeline gives it.
    def fast_fn(be, i):
        op = be.ops[i] if i < len(be.ops) else be.head
        dt = be.dtype
        if op is be.head:
            prev = be.ops[-1]
            if isinstance(prev, _Large) and prev.method == "fft":
                return op, ins[i].contiguous()
            return op, ins[i].to(dt).contiguous(memory_format=torch.channels_last)
        return op, ins[i].to(getattr(op, "in_dtype", dt)).contiguous(memory_format=torch.channels_last)

    n_body = len(backends["fp32"].ops)
    rows = []
    with torch.inference_mode():
        for i in range(len(model.layers)):
            if i > n_body:  # head layers are timed together at index n_body
                continue
            eager = model.layers if i == n_body else None
            eager_fn = (lambda z, a=i: _run_layers(model, a, z)) if eager is not None else model.layers[i]
            fast = {p: fast_fn(be, i) for p, be in backends.items()}
            ts = {"eager": []} | {p: [] for p in fast}
            for _ in range(args.rounds + 1):  # first round warms caches and oneDNN primitives
                ts["eager"].append(_time(eager_fn, ins[i]))
                for p, (op, inp) in fast.items():
                    # The backend runs its ops inside the memory pool (reuse_memory=True); eager does not.
                    with pooled(not args.no_pool):
                        ts[p].append(_time(op, inp))
            med = {k: statistics.median(v[1:]) for k, v in ts.items()}
            name = names[i] if i < n_body else "head (1x1 convs)"
            rows.append((name, med))
    total = {k: sum(m[k] for _, m in rows) for k in rows[0][1]}
    print(f"{'layer':24s} {'eager ms':>10s} " + " ".join(f"{p + ' ms':>10s} {'x':>6s}" for p in backends))
    for name, med in rows + [("total", total)]:
        line = f"{name:24s} {med['eager'] * 1e3:10.1f} "
        line += " ".join(f"{med[p] * 1e3:10.1f} {med['eager'] / med[p]:6.2f}" for p in backends)
        print(line)

    if args.mix:
        mix_compare(backends["fp32"], ins, names, args.rounds)

    if args.fft_sizes:
        be = backends["fp32"]
        for i, op in enumerate(be.ops):
            if not (isinstance(op, _Large) and op.method == "fft"):
                continue
            xin = ins[i].contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).contiguous()
            n, h, w, c = xin.shape
            k = op.fft.kernel
            chosen = op.fft.size_for(n, h, w)
            cands = [t for t in smooth_sizes(k + 8, 160)]
            print(f"\nlayer {names[i]}: FFT size sweep (cost model picks {chosen})")
            for t in cands:
                with torch.inference_mode(), pooled(not args.no_pool):
                    op.fft(xin, t)  # builds and caches the spectrum
                    tt = statistics.median(_time(lambda z: op.fft(z, t), xin) for _ in range(args.rounds))
                model_s = fft_cost(c, op.fft.out_channels, k, h - k + 1, w - k + 1, t, n)
                print(f"  T={t:4d} {tt * 1e3:8.1f} ms   model {model_s * 1e3:8.1f}{'  <- chosen' if t == chosen else ''}")


def mix_compare(be, ins, names, rounds):
    """Each FFT layer with the compiled mixing op and with the GEMM fallback, rounds interleaved."""
    from fastcount.inference.spectral import SpectralConv, has_spectral_mix_op

    if not has_spectral_mix_op():
        print("\n--mix: the compiled fastcount::spectral_mix op is not built")
        return
    for i, op in enumerate(be.ops):
        if not (isinstance(op, _Large) and op.method == "fft"):
            continue
        xin = ins[i].contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).contiguous()
        sc = op.fft
        n, h, w, _ = xin.shape
        t = sc.size_for(n, h, w)
        convs = {p: SpectralConv(sc.weight, sc.bias, sc.slope, t, compiled=p == "op") for p in ("gemm", "op")}
        ts = {p: [] for p in convs}
        with torch.inference_mode():
            for _ in range(rounds + 1):  # the first round builds the spectra
                for p, c in convs.items():
                    ts[p].append(_time(c, xin))
            err = float((convs["op"](xin) - convs["gemm"](xin)).abs().max() / convs["gemm"](xin).abs().max())
        med = {p: statistics.median(v[1:]) for p, v in ts.items()}
        print(f"\nlayer {names[i]} input {tuple(xin.shape)} NHWC, T={t}: transpose+GEMM {med['gemm'] * 1e3:.1f} ms, "
              f"spectral_mix op {med['op'] * 1e3:.1f} ms, x{med['gemm'] / med['op']:.2f} (median of {rounds}, "
              f"interleaved; max rel diff {err:.1e})")


def count_error(n_images: int, weights=None):
    from pathlib import Path

    import numpy as np

    from fastcount.data import load_dataset
    from fastcount.inference import compile as fc_compile
    from fastcount.io import load_model

    root = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    ds = load_dataset("vgg_cells", root)
    if weights:
        model = load_model(weights)
    else:
        torch.manual_seed(0)
        model = CountCeption().eval()
    fast = {p: fc_compile(model, backend="cpu", precision=p) for p in (["fp32", "bf16"] if bf16_supported() else ["fp32"])}
    errs = {p: [] for p in fast}
    counts, truth = [], []
    for i in range(len(ds) - n_images, len(ds)):
        img, dots = ds[i]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            ref = float(model(x).double().sum()) / model.geometry.redundancy
        counts.append(ref)
        truth.append(float(dots.sum()))
        for p, be in fast.items():
            errs[p].append(abs(float(be(x).double().sum()) / model.geometry.redundancy - ref))
    print(f"weights {weights or 'random init'}; {n_images} VGG test images (256x256); eager fp32 count "
          f"mean {np.mean(counts):.2f} (truth mean {np.mean(truth):.2f}, MAE {np.mean(np.abs(np.array(counts) - truth)):.2f})")
    for p, e in errs.items():
        print(f"  cpu {p}: |count - eager fp32 count| mean {np.mean(e):.5f}, max {np.max(e):.5f}")


def _run_layers(model, start, x):
    for layer in list(model.layers)[start:]:
        x = layer(x)
    return x


if __name__ == "__main__":
    main()
