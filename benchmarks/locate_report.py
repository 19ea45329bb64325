"""Where the cells are: precision, recall and F1 of ``fastcount.locate`` beside two baselines, and its cost.

On the VGG test set (last 100 images, 5 px) and the MBM test set (last 11,
halved as in the paper's protocol, 6 px), with one-to-one (Hungarian)
matching of predicted to annotated points within the radius:

- ``fastcount``: ``locate`` on the model's count map with the model's own
  ``LocateParams`` (from its weights; the MBM model's use the image as a guide).
- ``RL 200 + maxima``: plain Richardson-Lucy (200 iterations, whole image) on
  the count map, then the ``round(count)`` highest local maxima.
- ``LoG, true count``: Laplacian-of-Gaussian blobs of the image itself, the
  true number of highest peaks (a baseline that is told the answer's size).

Cost: seconds per megapixel of the count (the ``cpu`` backend) and of
``locate`` on the same images, and on one synthetic slide ``count_slide``
at the default tile with and without ``points=True`` (same run, same load).

    nice -n 10 python benchmarks/locate_report.py --data-root ../shared/datasets [--limit 12] [--json out.json]
    python benchmarks/locate_report.py --data-root ../shared/datasets --weights mbm --datasets mbm --slide-side 0

``--tune`` instead chooses the model's ``LocateParams`` on its validation images
(the weights' recorded split; never the test images) by F1 over a small grid,
prints the best, and with ``--save`` writes them into the weights' metadata:

    python benchmarks/locate_report.py --data-root ../shared/datasets --weights mbm --datasets mbm --tune --save
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

import fastcount
from fastcount.data import load_dataset
from fastcount.inference import compile as compile_backend
from fastcount.localise import LocateParams
from fastcount.system import cpu_flags

# dataset -> (test images, matching radius px, halve, LoG sigma px, cells are dark on a light background)
SETS = {"vgg_cells": (100, 5.0, False, 2.0, False), "mbm": (11, 6.0, True, 4.0, True)}
DEFAULT_WEIGHTS = {"vgg_cells": "vgg", "mbm": "mbm"}  # each dataset's packaged model


def prf(pred: np.ndarray, true: np.ndarray, radius: float) -> tuple[int, int, int]:
    """(true positives, predicted, annotated) under one-to-one matching within ``radius``."""
    if len(pred) == 0 or len(true) == 0:
        return 0, len(pred), len(true)
    d = np.linalg.norm(pred[:, None, :] - true[None, :, :], axis=-1)
    cost = np.where(d <= radius, d, 1e9)
    r, c = linear_sum_assignment(cost)
    return int((cost[r, c] <= radius).sum()), len(pred), len(true)


def dots_to_points(dots: np.ndarray) -> np.ndarray:
    r, c = np.nonzero(dots)
    return np.repeat(np.stack([r, c], 1), dots[r, c].astype(np.int64), axis=0).astype(np.float64)


def top_maxima(a: np.ndarray, n: int, size: int = 3) -> np.ndarray:
    """The ``n`` highest local maxima of ``a`` as (row, col)."""
    if n <= 0:
        return np.zeros((0, 2))
    is_max = (a == ndimage.maximum_filter(a, size=size, mode="constant")) & (a > 0)
    r, c = np.nonzero(is_max)
    order = np.argsort(-a[r, c], kind="stable")[:n]
    return np.stack([r[order], c[order]], 1).astype(np.float64)


def rl_baseline(count_map: np.ndarray, r: int, iterations: int = 200) -> np.ndarray:
    """Plain Richardson-Lucy for ``F = box_r * L`` over the whole image, then round(count) maxima."""
    F = torch.from_numpy(np.clip(count_map, 0, None)).double()
    H, W = F.shape[0] - r, F.shape[1] - r

    L = torch.full((H, W), float(F.sum()) / (r * r) / (H * W), dtype=torch.float64)
    for _ in range(iterations):
        est = _box_full(L, r)
        ratio = torch.where(est > 0, F / est.clamp(min=1e-300), torch.zeros((), dtype=torch.float64))
        L = L * _box_adjoint(ratio, r) / (r * r)
    n = max(0, round(float(count_map.sum()) / (r * r)))
    return top_maxima(L.numpy(), n)


def _cum(x, dim):
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), torch.cumsum(x, dim)], dim)


def _box_full(L, r):
    """out[Y, X] = sum L[Y - r .. Y - 1, X - r .. X - 1] (zeros outside), shape (H + r, W + r)."""
    for dim in (0, 1):
        c = _cum(torch.nn.functional.pad(L, (r, r) if dim == 1 else (0, 0, r, r)), dim)
        n = L.shape[dim] + r
        L = c.narrow(dim, r, n) - c.narrow(dim, 0, n)
    return L


def _box_adjoint(G, r):
    """out[p] = sum G[p + 1 .. p + r] (the adjoint of ``_box_full``), shape (H, W)."""
    for dim in (0, 1):
        c = _cum(G, dim)
        n = G.shape[dim] - r
        G = c.narrow(dim, r + 1, n) - c.narrow(dim, 1, n)
    return G


def log_baseline(image: np.ndarray, n: int, sigma: float, dark: bool) -> np.ndarray:
    g = image.astype(np.float64).mean(axis=2)
    resp = ndimage.gaussian_laplace(g, sigma) * sigma ** 2
    return top_maxima(resp if dark else -resp, n)


def evaluate(name: str, root: str, model, fn, limit: int | None) -> dict:
    n_test, radius, halve, sigma, dark = SETS[name]
    params = LocateParams.of(model)
    ds = load_dataset(name, root, halve=halve)
    idx = list(range(len(ds) - n_test, len(ds)))[: limit or n_test]
    g = model.geometry
    tallies = {k: np.zeros(3, np.int64) for k in ("fastcount", "RL 200 + maxima", "LoG, true count")}
    t_count = t_locate = mpx = 0.0
    counts = []
    for i in idx:
        img, dots = ds[i]
        true = dots_to_points(dots)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        t0 = time.perf_counter()
        with torch.inference_mode():
            cm = fn(x)
        t1 = time.perf_counter()
        pts = fastcount.locate(cm, patch_size=g.r, stride=g.stride, image=img, params=params)
        t2 = time.perf_counter()
        t_count += t1 - t0
        t_locate += t2 - t1
        mpx += img.shape[0] * img.shape[1] / 1e6
        cmap = cm[0, 0].double().numpy()
        counts.append((float(cmap.sum()) / g.redundancy, len(true), len(pts)))
        tallies["fastcount"] += prf(pts.coords, true, radius)
        tallies["RL 200 + maxima"] += prf(rl_baseline(cmap, g.r), true, radius)
        tallies["LoG, true count"] += prf(log_baseline(img, len(true), sigma, dark), true, radius)
    rows = {}
    for k, (tp, p, a) in tallies.items():
        pr, rc = tp / max(p, 1), tp / max(a, 1)
        rows[k] = {"precision": pr, "recall": rc, "f1": 2 * pr * rc / max(pr + rc, 1e-12)}
    c = np.array(counts)
    return {"dataset": name, "images": len(idx), "locate_params": params.to_json(), "radius_px": radius, "halved": halve, "log_sigma": sigma,
            "rows": rows, "count_mae": float(np.abs(c[:, 0] - c[:, 1]).mean()),
            "points_equal_round_count": bool((np.round(c[:, 0]).clip(0) == c[:, 2]).all()),
            "count_s_per_mpx": t_count / mpx, "locate_s_per_mpx": t_locate / mpx}


def validation_images(name: str, root: str, model):
    """(image, count map input, true points) of the model's validation images (its recorded split)."""
    meta = model.metadata or {}
    if "split" in meta:
        names = set(json.loads(meta["split"])["val"])
    elif "val_images" in meta:
        names = set(json.loads(meta["val_images"]))
    else:
        raise SystemExit("--tune needs weights that record their validation images (split / val_images)")
    ds = load_dataset(name, root, halve=SETS[name][2])
    return [ds[i] for i, n in enumerate(ds.names) if str(n) in names]


def tune_grid(dark: bool) -> list[LocateParams]:
    polarity = "dark" if dark else "bright"
    grid = [LocateParams(eps=e, smooth=sm) for e in (1e-4, 3e-4, 1e-3) for sm in (0.0, 1.0, 2.0)]
    grid += [LocateParams(eps=e, smooth=sm, guide=polarity, guide_sigma=sg)
             for e in (1e-4, 1e-3) for sm in (1.0, 2.0, 3.0) for sg in (1.5, 2.0, 3.0, 4.0, 5.0)]
    return grid


def tune(name: str, root: str, model, fn) -> tuple[LocateParams, list]:
    """The grid's LocateParams with the best F1 on the validation images (ties: the earlier, simpler one)."""
    _, radius, _, _, dark = SETS[name]
    g = model.geometry
    data = []
    for img, dots in validation_images(name, root, model):
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            data.append((img, fn(x), dots_to_points(dots)))
    rows = []
    for p in tune_grid(dark):
        t = np.zeros(3, np.int64)
        for img, cm, true in data:
            t += prf(fastcount.locate(cm, patch_size=g.r, stride=g.stride, image=img, params=p).coords, true, radius)
        pr, rc = t[0] / max(t[1], 1), t[0] / max(t[2], 1)
        rows.append((2 * pr * rc / max(pr + rc, 1e-12), p))
        print(f"{rows[-1][0]:.4f}  {p}", flush=True)
    best = max(rows, key=lambda r: r[0])  # max keeps the first of equal F1s
    return best[1], rows


def slide_cost(model, side: int) -> dict:
    """count_slide at the default tile on a synthetic image with cells everywhere (VGG density, no
    background to skip: the most points per pixel), without and with points, in the same session."""
    from fastcount.data.synth import cell_image

    img = cell_image(side, seed=0)[0]
    out = {}
    for points in (False, True):
        res = fastcount.count_slide(img, model, mask=None, progress=False, backend="cpu", points=points)
        out["with_points" if points else "count_only"] = res.stats["seconds"]
        if points:
            out["locate_seconds"] = res.stats["locate_seconds"]
            out["points"] = len(res.points)
            out["total"] = res.total
    out["megapixels"] = side * side / 1e6
    out["tile"] = res.stats["tile"]
    out["ratio"] = out["with_points"] / out["count_only"]
    return out


def table(results) -> str:
    lines = ["| dataset (images, radius) | method | precision | recall | F1 |", "|---|---|---|---|---|"]
    for r in results:
        for k, v in r["rows"].items():
            lines.append(f"| {r['dataset']} ({r['images']}, {r['radius_px']:g} px) | {k} | {v['precision']:.3f} | "
                         f"{v['recall']:.3f} | **{v['f1']:.3f}** |" if k == "fastcount" else
                         f"| {r['dataset']} ({r['images']}, {r['radius_px']:g} px) | {k} | {v['precision']:.3f} | "
                         f"{v['recall']:.3f} | {v['f1']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--weights", default=None,
                    help="weights for every dataset (default: each dataset's packaged model, vgg / mbm)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images of each set")
    ap.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--slide-side", type=int, default=2048, help="synthetic slide side for the cost run (0: skip)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tune", action="store_true", help="choose LocateParams on the validation images instead")
    ap.add_argument("--save", action="store_true", help="with --tune: write the best into the weights' metadata")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    def weights_for(dataset):
        return args.weights or DEFAULT_WEIGHTS[dataset]

    if args.tune:
        model = fastcount.load_model(weights_for(args.datasets[0])).eval()
        fn = compile_backend(model, "cpu", "fp32", torch.device("cpu"))
        best, _ = tune(args.datasets[0], args.data_root, model, fn)
        print(f"best on {len(validation_images(args.datasets[0], args.data_root, model))} validation images: {best}")
        if args.save:
            from fastcount.io import MODELS, default_weights_path, packaged_weights_path, save_model
            from fastcount.localise import METADATA_KEY

            w = weights_for(args.datasets[0])
            path = packaged_weights_path(w) if w in MODELS else (w or default_weights_path())
            save_model(model, path, metadata={**model.metadata, METADATA_KEY: best.to_json()})
            print(f"wrote {METADATA_KEY}={best.to_json()} into {path}")
        return
    results = []
    for d in args.datasets:
        m = fastcount.load_model(weights_for(d)).eval()
        results.append(evaluate(d, args.data_root, m, compile_backend(m, "cpu", "fp32", torch.device("cpu")), args.limit))
        results[-1]["weights"] = weights_for(d)
    # the points' cost for each model used (the mbm model's include the image guide)
    cost = {weights_for(d): slide_cost(fastcount.load_model(weights_for(d)).eval(), args.slide_side)
            for d in args.datasets} if args.slide_side else {}
    print(table(results))
    for r in results:
        print(f"{r['dataset']}: count MAE {r['count_mae']:.2f}; points == round(count) on every image: "
              f"{r['points_equal_round_count']}; count {r['count_s_per_mpx']:.2f} s/Mpx, "
              f"locate {r['locate_s_per_mpx']:.2f} s/Mpx ({r['locate_s_per_mpx'] / r['count_s_per_mpx']:.0%})")
    for w, c in cost.items():
        print(f"count_slide {c['megapixels']:.1f} Mpx, tile {c['tile']}, weights {w}: {c['count_only']:.1f} s count "
              f"only, {c['with_points']:.1f} s with points (x{c['ratio']:.2f}; locate {c['locate_seconds']:.1f} s)")
    meta = {"weights": {r["dataset"]: r["weights"] for r in results}, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))),
            "load": open("/proc/loadavg").read().split()[:3] if platform.system() == "Linux" else None}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "slide_cost": cost, "meta": meta}, f, indent=1)


if __name__ == "__main__":
    main()
