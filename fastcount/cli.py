"""``fastcount`` command line: train, evaluate, count, info."""
from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["main", "build_parser"]


def _add_data_args(p):
    p.add_argument("--dataset", required=True, choices=["vgg_cells", "mbm", "folder"])
    p.add_argument("--data-root", required=True, help="folder holding the dataset (or its parent)")
    p.add_argument("--red-threshold", type=float, default=100, help="R - max(G,B) for a red dot pixel (0..255)")
    p.add_argument("--no-halve", action="store_true", help="MBM: keep 600x600 (the paper halves to 300x300)")


def _add_train_args(p):
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--crop", type=int, default=None, help="random crop side for training (faster on CPU)")
    p.add_argument("--width", type=float, default=1.0, help="filter-count multiplier (1 = the paper's model)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-augment", action="store_true", help="no random flips/rotations")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="fastcount", description="Count-ception cell counting, fast and exact.")
    ap.add_argument("--version", action="version", version=f"fastcount {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with the paper's protocol")
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--out", required=True, help="output weights (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt if present")

    p = sub.add_parser("evaluate", help="test MAE on the reference test set, or the whole protocol")
    _add_data_args(p)
    p.add_argument("--weights", default=None, help="weights to test (default: packaged weights)")
    p.add_argument("--splits", type=int, default=0, help="train+test K random splits; print mean +- std")
    _add_train_args(p)

    p = sub.add_parser("count", help="count objects in an image")
    p.add_argument("path")
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")

    sub.add_parser("info", help="versions, compiled ops, devices")
    return ap


def _dataset(args):
    from .data import load_dataset

    halve = args.dataset == "mbm" and not args.no_halve
    return load_dataset(args.dataset, args.data_root, halve=halve, red_threshold=args.red_threshold)


def _config(args):
    from .train import TrainConfig

    return TrainConfig(n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, crop=args.crop, width=args.width,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, stride=args.stride,
                       augment=not args.no_augment, device=args.device)


def cmd_train(args):
    from .train import evaluate, train

    ds = _dataset(args)
    print(f"{ds}: training on {args.n_train}, validating on {args.n_val}, test = last {ds.test_size}")
    res = train(ds, _config(args), out=args.out, resume=args.resume, progress=not args.quiet)
    test = evaluate(res.model, ds, res.split["test"], args.device)
    print(f"best val MAE {res.best_val_mae:.3f} (epoch {res.best_epoch}); test MAE {test['mae']:.3f} "
          f"on {test['n']} images; {res.seconds:.1f}s; weights -> {args.out}")
    return 0


def cmd_evaluate(args):
    from .train import evaluate, run_protocol, split_indices

    ds = _dataset(args)
    if args.splits:
        r = run_protocol(ds, args.splits, _config(args), progress=not args.quiet)
        print(f"{ds.name} N={args.n_train}: test MAE {r['mean']:.2f} +- {r['std']:.2f} over {args.splits} splits")
        return 0
    from .io import load_model

    model = load_model(args.weights, device="cpu" if args.device == "auto" else args.device)
    _, _, test_idx = split_indices(len(ds), ds.test_size, 0, 0, 0)
    test_idx = test_idx or list(range(len(ds)))
    r = evaluate(model, ds, test_idx, args.device if args.device != "auto" else "cpu")
    print(f"{ds.name}: test MAE {r['mae']:.3f}, RMSE {r['rmse']:.3f}, on {r['n']} images")
    return 0


def cmd_count(args):
    from .api import count_image
    from .data import read_image

    t0 = time.perf_counter()
    img = read_image(args.path)
    n = count_image(img, args.weights, device=args.device)
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"path": args.path, "count": n, "seconds": dt}))
    else:
        print(f"{args.path}: {n:.1f} objects ({img.shape[1]}x{img.shape[0]} px, {dt:.2f}s)")
    return 0


def cmd_info(args):
    import torch

    from . import __version__
    from .io import default_weights_path
    from .ops import has_compiled_ops

    print(f"fastcount {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"compiled ops: {'yes' if has_compiled_ops() else 'no (PyTorch reference)'}")
    print(f"default weights: {default_weights_path() if default_weights_path().is_file() else 'not installed'}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "count": cmd_count, "info": cmd_info}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastcount {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastcount {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
