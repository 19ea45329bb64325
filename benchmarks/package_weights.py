"""Package weights written by ``fastcount train`` as a packaged model (fastcount/weights/).

Keeps the training record the weights carry (split, config, test MAE), adds the
test-set description, the machine and the command, and stores a bf16 rounding
calibrated on a few training images (as the default weights have):

    python benchmarks/package_weights.py runs/ft_default_n15.safetensors \\
        --dataset mbm --data-root ../shared/datasets --out fastcount/weights/mbm.safetensors \\
        --command "fastcount train ..."
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

import fastcount
from fastcount.data import load_dataset
from fastcount.inference import calibrate_bf16
from fastcount.io import read_metadata


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--dataset", required=True, choices=["vgg_cells", "mbm"])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", required=True, help="the fastcount train command that made the weights")
    ap.add_argument("--calibrate", type=int, default=8, help="training images for the bf16 rounding (0 = none)")
    args = ap.parse_args(argv)
    meta = read_metadata(args.weights)
    if "test_mae" not in meta:
        ap.error(f"{args.weights} records no test MAE (train with a held-out test set)")
    model = fastcount.load_model(args.weights)
    ds = load_dataset(args.dataset, args.data_root, halve=args.dataset == "mbm")
    split = json.loads(meta["split"])
    n = len(split["test"])
    model.metadata.update(
        test_images=f"{args.dataset}: the last {n} of {len(ds)} ({split['test'][0]}..{split['test'][-1]})"
                    + (", halved to 300x300" if args.dataset == "mbm" else ""),
        machine=f"{platform.processor() or platform.machine()}, torch {torch.__version__}", command=args.command)
    if args.calibrate:
        where = {name: i for i, name in enumerate(ds.names)}
        imgs = [ds[where[name]][0] for name in split["train"][: args.calibrate]]
        model.bf16_rounding = calibrate_bf16(model, imgs, progress=False)
    fastcount.save_model(model, args.out, metadata=model.metadata)
    print(f"packaged {args.weights} (test MAE {float(meta['test_mae']):.3f} on {n} images) -> {args.out}")


if __name__ == "__main__":
    main()
