"""bf16 count error of the cpu backend, nearest vs count-calibrated rounding.

    python benchmarks/bf16_count_error.py --model default --calibrate train --test 100
    python benchmarks/bf16_count_error.py --model full --calibrate 101-110 --test 20

For each VGG test image (256x256), |bf16 count - eager fp32 count| with the
folded weights rounded to nearest and with the calibrated rounding
(``fastcount.inference.calibrate_bf16``). ``--model default`` is the packaged
weights (test images 101-200, calibration on its own training images);
``--model full`` is the benchmark's random-init full-width model (seed 0).
``--write PATH`` saves the model with the calibrated rounding (and its
metadata) to PATH, as the packaged default weights were made.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import fastcount
from fastcount.data import read_image
from fastcount.inference import calibrate_bf16
from fastcount.inference import compile as fc_compile

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "vgg_cells"


def _read(name: str) -> np.ndarray:
    return read_image(DATA / name)


def _names(spec: str, model) -> list[str]:
    if spec == "train":
        return json.loads(model.metadata["train_images"])
    lo, hi = (int(v) for v in spec.split("-"))
    return [f"{i:03d}cell.png" for i in range(lo, hi + 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default', 'full' or a weights path")
    ap.add_argument("--calibrate", default="train", help="'train' (the weights' training images) or a range like 101-110")
    ap.add_argument("--test", type=int, default=100, help="count the last N of the 200 VGG images")
    ap.add_argument("--write", default=None, help="save the model with its calibrated rounding here")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model == "full":
        torch.manual_seed(0)
        model = fastcount.CountCeption().eval()
        model.metadata = {}
    else:
        model = fastcount.load_model(None if args.model == "default" else args.model)
    model.bf16_rounding = None
    cal = _names(args.calibrate, model)
    t0 = time.perf_counter()
    rounding = calibrate_bf16(model, [_read(n) for n in cal], progress=True)
    cal_s = time.perf_counter() - t0
    rounding.info["calibration_images"] = cal
    print(f"calibrated on {len(cal)} images ({cal[0]}..{cal[-1]}) in {cal_s:.1f} s: {rounding.info}")

    test = [f"{i:03d}cell.png" for i in range(201 - args.test, 201)]
    overlap = sorted(set(test) & set(cal))
    if overlap:
        print(f"note: {len(overlap)} test images were also calibration images: {overlap[:5]}")
    backends = {"nearest": fc_compile(model, "cpu", "bf16", rounding=None),
                "calibrated": fc_compile(model, "cpu", "bf16", rounding=rounding)}
    print(backends["calibrated"])
    err = {k: [] for k in backends}
    counts = []
    redundancy = (model.patch_size / model.stride) ** 2
    for name in test:
        x = torch.from_numpy(_read(name)).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            ref = float(model(x).double().sum()) / redundancy
        counts.append(ref)
        for k, b in backends.items():
            err[k].append(abs(float(b(x).double().sum()) / redundancy - ref))
    print(f"{len(test)} test images ({test[0]}..{test[-1]}), mean count {np.mean(counts):.1f}")
    print("| rounding | mean abs count error | max | images over 0.05 |")
    print("|---|---|---|---|")
    for k, e in err.items():
        e = np.array(e)
        print(f"| {k} | {e.mean():.4f} | {e.max():.4f} | {(e > 0.05).sum()} |")
    if args.write:
        model.bf16_rounding = rounding
        meta = {k: v for k, v in model.metadata.items()}
        fastcount.save_model(model, args.write, metadata=meta)
        print("wrote", args.write)


if __name__ == "__main__":
    main()
