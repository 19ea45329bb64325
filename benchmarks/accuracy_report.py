"""Test-set accuracy of finished (or stopped) training runs, beside the paper's Table 2.

Reads ``fastcount train`` checkpoints (``<out>.ckpt``: history, config and the
best-validation weights), evaluates the best model on the dataset's reference test
set with the eager fp32 model, prints a markdown table, draws the learning curves,
and optionally packages one run as the default weights (safetensors + metadata).

    python benchmarks/accuracy_report.py --data-root ../shared/datasets \\
        runs/vgg32_s0.safetensors.ckpt runs/mbm15_s0.safetensors.ckpt \\
        --png docs/learning_curves.png --json docs/accuracy.json \\
        [--package fastcount/weights/default.safetensors --package-run 0]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import fastcount
from fastcount.data import load_dataset
from fastcount.plots import plot_learning_curves
from fastcount.train import _load_checkpoint, evaluate, split_indices

# The paper's Table 2: Count-ception test MAE (mean +- std over >= 10 splits).
PAPER = {("vgg_cells", 32): (2.4, 0.4), ("vgg_cells", 50): (2.3, 0.4), ("mbm", 5): (12.6, 3.0),
         ("mbm", 10): (10.7, 2.5), ("mbm", 15): (8.8, 2.3)}


def report(ckpt: Path, root: str) -> dict:
    _, best, _, _, meta = _load_checkpoint(ckpt)
    run = meta["run"]
    ds = load_dataset(run["dataset"], root, halve=run["dataset"] == "mbm")  # the paper's MBM protocol, as the CLI
    model = fastcount.CountCeption(3, run["patch_size"], run["stride"], run["width"])
    model.load_state_dict(best)
    model.eval()
    tr, va, te = split_indices(len(ds), ds.test_size, run["n_train"], run["n_val"], run["seed"])
    t0 = time.perf_counter()
    test = evaluate(model, ds, te)
    return {"ckpt": str(ckpt), "dataset": run["dataset"], "n_train": run["n_train"], "n_val": run["n_val"],
            "seed": run["seed"], "width": run["width"], "crop": run["crop"], "batch_size": run["batch_size"],
            "lr": run["lr"], "lr_schedule": run.get("lr_schedule", "constant"), "bn_recal": run.get("bn_recal", 0),
            "head_init": run.get("head_init", False), "stride": run["stride"],
            "epochs_run": meta["epoch"], "best_epoch": meta["best_epoch"], "best_val_mae": meta["best_mae"],
            "train_seconds": meta["seconds"], "test_mae": test["mae"], "test_rmse": test["rmse"],
            "test_mean_rel_error": test["mean_rel_error"], "n_test": test["n"], "eval_seconds": time.perf_counter() - t0,
            "history": meta["history"], "train_images": [ds.names[i] for i in tr],
            "val_images": [ds.names[i] for i in va], "model": model}


def table(rows) -> str:
    out = ["| dataset | N | width | epochs (best) | crop | lr | precision | seed | train time | test MAE | RMSE | paper |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = PAPER.get((r["dataset"], r["n_train"]))
        out.append(f"| {r['dataset']} | {r['n_train']} | {r['width']:g} | {r['epochs_run']} ({r['best_epoch']}) | "
                   f"{r['crop']} | {r['lr']:g} {r['lr_schedule']} | fp32 | {r['seed']} | "
                   f"{r['train_seconds'] / 60:.0f} min | **{r['test_mae']:.2f}** | {r['test_rmse']:.2f} | "
                   f"{f'{p[0]} +- {p[1]}' if p else '-'} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--png", default=None, help="learning curves PNG")
    ap.add_argument("--json", default=None, help="write the figures (no weights) here")
    ap.add_argument("--package", default=None, help="write run --package-run's best model here as default weights")
    ap.add_argument("--package-run", type=int, default=0)
    ap.add_argument("--machine", default=f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    args = ap.parse_args(argv)
    for c in args.checkpoints:
        if not c.is_file():
            ap.error(f"checkpoint not found: {c}")
    rows = [report(c, args.data_root) for c in args.checkpoints]
    print(table(rows))
    if args.png:
        hist = {f"{r['dataset']} N={r['n_train']} (test MAE {r['test_mae']:.2f})": r["history"] for r in rows}
        refs = {f"paper {d} N={n}: {PAPER[(d, n)][0]}": PAPER[(d, n)][0] for d, n in
                {(r["dataset"], r["n_train"]) for r in rows} if (d, n) in PAPER}
        print("curves ->", plot_learning_curves(hist, args.png, title="fastcount train (CPU)", references=refs))
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "model"} for r in rows], indent=1))
    if args.package:
        r = rows[args.package_run]
        keys = ("dataset", "n_train", "n_val", "seed", "width", "crop", "lr", "lr_schedule", "epochs_run", "best_epoch")
        fastcount.save_model(r["model"], args.package, metadata={
            "dataset": r["dataset"], "test_mae": round(r["test_mae"], 3), "test_rmse": round(r["test_rmse"], 3),
            "test_images": "VGG cells: last 100 of 200 (101cell.png..200cell.png)" if r["dataset"] == "vgg_cells"
            else f"last {r['n_test']}",
            "train_images": r["train_images"], "val_images": r["val_images"], "best_val_mae": r["best_val_mae"],
            "train_config": {k: r[k] for k in keys}, "train_seconds": round(r["train_seconds"]),
            "machine": args.machine})
        print("packaged ->", args.package)


if __name__ == "__main__":
    main()
