"""``fastcount`` command line: train, evaluate, count, demo, info."""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__
from .data import load_dataset, load_slide_regions, read_image
from .data.synth import write_synthetic_slide
from .devices import resolve_device
from .export import export_onnx
from .inference import BACKENDS, DEFAULT_BACKEND, PRECISIONS, calibrate_bf16
from . import io as weights_io  # default_weights_path read at call time (tests point it elsewhere)
from .io import load_model, save_model
from .model import CountCeption
from .ops import has_compiled_ops
from .plots import plot_learning_curves
from .slide import count_slide
from .slide.plan import DEFAULT_CPU_TILE, DEFAULT_TILE
from .train import TrainConfig, evaluate, run_protocol, held_out_indices, train

__all__ = ["main", "build_parser"]


def _add_data_args(p):
    p.add_argument("--dataset", required=True, choices=["vgg_cells", "mbm", "folder", "slide"],
                   help="slide: regions of one slide (--data-root SLIDE --annotations GEOJSON)")
    p.add_argument("--data-root", required=True, help="folder holding the dataset (or its parent); --dataset slide: the slide")
    p.add_argument("--annotations", default=None, metavar="GEOJSON",
                   help="--dataset slide: QuPath GeoJSON with the points and the annotated regions (level-0 pixels)")
    p.add_argument("--level", type=int, default=0, help="--dataset slide: pyramid level to read the regions at")
    p.add_argument("--point-class", action="append", default=None, metavar="NAME",
                   help="point annotations: keep only points of this class (repeatable)")
    p.add_argument("--red-threshold", type=float, default=100, help="R - max(G,B) for a red dot pixel (0..255)")
    p.add_argument("--no-halve", action="store_true", help="MBM: keep 600x600 (the paper halves to 300x300)")


def _add_train_args(p):
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--crop", type=int, default=None, help="random crop side for training (faster on CPU)")
    p.add_argument("--width", type=float, default=1.0, help="filter-count multiplier (1 = the paper's model)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (the paper's 5e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-augment", action="store_true", help="no random flips/rotations")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                   help="cosine: anneal lr to 1%% of --lr over the run")
    p.add_argument("--bn-recal", type=int, default=32, metavar="N",
                   help="re-estimate BN statistics on N training crops before each validation")
    p.add_argument("--fft", action="store_true", help="large convs by FFT (faster training on CPU, same model)")
    p.add_argument("--n-test", type=_count_arg, default=None, metavar="K",
                   help="hold out K images (seeded by --seed) for testing; default: the dataset's reference test set")
    p.add_argument("--test-images", default=None, metavar="A.png,B.png",
                   help="hold out exactly these images (comma-separated names) for testing")
    p.add_argument("--init", default=None, metavar="default|NAME|PATH",
                   help="fine-tune: start from the packaged weights ('default', 'vgg', 'mbm') or a weights file")


def _add_count_args(p, tile=None):
    p.add_argument("--weights", default=None, help="weights (.safetensors); default: the packaged weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--tile", type=int, default=tile, help="output tile side in pixels" + (
        f" (default {DEFAULT_CPU_TILE} on the CPU, {DEFAULT_TILE} on a GPU)" if tile is None else ""))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None,
                   help="reader threads (count with several slides: local Dask worker processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _count_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:

    ap = argparse.ArgumentParser(prog="fastcount", description="Count-ception cell counting, fast and exact.")
    ap.add_argument("--version", action="version", version=f"fastcount {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with the paper's protocol")
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--out", required=True, help="output weights (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt if present")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the learning curves here (needs matplotlib)")
    p.add_argument("--bf16-calibrate", type=_count_arg, default=8, metavar="N",
                   help="store a bf16 rounding calibrated on N training images with the weights (0 = none)")

    p = sub.add_parser("evaluate", help="test MAE on the reference test set, or the whole protocol")
    _add_data_args(p)
    p.add_argument("--weights", default=None, help="weights to test (default: packaged weights)")
    p.add_argument("--splits", type=int, default=0, help="train+test K random splits; print mean +- std")
    _add_train_args(p)

    p = sub.add_parser("count", help="count objects in an image or a whole slide (exact tiled counting)")
    p.add_argument("path", nargs="+", help="slide (SVS, NDPI, MRXS, DICOM, tiled/OME TIFF) or image (PNG, JPEG, "
                   "...); several slides, glob patterns or .txt files listing paths count on a Dask cluster")
    _add_count_args(p)
    p.add_argument("--level", type=int, default=0, help="pyramid level to count at (0 = full resolution)")
    p.add_argument("--mpp", type=float, default=None, help="instead of --level: target microns per pixel")
    p.add_argument("--mask", default="auto",
                   help="'auto' (tissue mask), 'none', or a mask image (non-zero = count) at any resolution")
    p.add_argument("--heatmap", default=None, help="write a density heatmap PNG here")
    p.add_argument("--geojson", default=None,
                   help="write the density grid as QuPath GeoJSON here (with --points: the points, as detections)")
    p.add_argument("--checkpoint", default=None, help="resume file for long slides")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out-dir", default=None, help="several slides: each slide's JSON, heatmap and GeoJSON here "
                   "(a rerun skips finished slides and resumes partial ones)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="several slides: Dask scheduler to use "
                   "(default: a local cluster of --workers processes)")
    p.add_argument("--summary", default=None, help="several slides: the per-slide table as .csv or .parquet")
    p.add_argument("--split", type=int, default=None, help="several slides: most tiles per unit of work")
    p.add_argument("--points", default=None,
                   help="also locate the objects: write x,y,score CSV here (level-0 pixels); "
                        "--geojson then writes them as QuPath detections")

    p = sub.add_parser("demo", help="count a synthetic slide with known ground truth (the main job, end to end)")
    _add_count_args(p, tile=256)
    p.add_argument("--size", type=int, default=1024, help="slide side in pixels (default 1024: well under a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tissue-fraction", type=float, default=0.15)
    p.add_argument("--untrained", action="store_true",
                   help="if no weights are installed, run with a random (untrained) model: the count is meaningless")
    p.add_argument("--width", type=float, default=1.0, help="--untrained: filter-count multiplier of the random model")
    p.add_argument("--out", default=None, help="keep the synthetic slide in this folder (default: a temp dir)")
    p.add_argument("--heatmap", default="fastcount_demo_heatmap.png", help="heatmap PNG path")

    p = sub.add_parser("export", help="write the model (BatchNorm folded) for other runtimes")
    p.add_argument("--onnx", required=True, metavar="PATH", help="ONNX file to write (geometry in its metadata)")
    p.add_argument("--weights", default=None, help="weights (.safetensors); default: the packaged weights")

    sub.add_parser("info", help="versions, compiled ops, devices")
    sub.add_parser("models", help="the packaged models: training data, test MAE, intended stain")
    return ap


def _dataset(args):

    if args.dataset == "slide":
        if args.annotations is None:
            raise ValueError("--dataset slide needs --annotations GEOJSON (points and regions)")
        return load_slide_regions(args.data_root, args.annotations, level=args.level, classes=args.point_class)
    halve = args.dataset == "mbm" and not args.no_halve
    return load_dataset(args.dataset, args.data_root, halve=halve, red_threshold=args.red_threshold,
                        classes=args.point_class)


def _test_arg(args):
    if args.n_test is not None and args.test_images:
        raise ValueError("give --n-test K or --test-images NAMES, not both")
    if args.test_images:
        return [t.strip() for t in args.test_images.split(",") if t.strip()]
    return args.n_test


def _config(args):

    return TrainConfig(n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, crop=args.crop, width=args.width,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, stride=args.stride,
                       augment=not args.no_augment, device=args.device, fft=args.fft,
                       lr_schedule=args.lr_schedule, bn_recal=args.bn_recal, test=_test_arg(args), init=args.init)


def cmd_train(args):

    ds = _dataset(args)
    cfg = _config(args)
    print(f"{ds}: training on {args.n_train}, validating on {args.n_val}, test = {_describe_test(cfg.test, ds)}")
    res = train(ds, cfg, out=args.out, resume=args.resume, progress=not args.quiet)
    test = evaluate(res.model, ds, res.split["test"], args.device)
    if test["n"]:
        print(f"best val MAE {res.best_val_mae:.3f} (epoch {res.best_epoch}); test MAE {test['mae']:.3f} "
              f"on {test['n']} images; {res.seconds:.1f}s; weights -> {args.out}")
    else:
        print(f"best val MAE {res.best_val_mae:.3f} (epoch {res.best_epoch}); no held-out test images "
              f"(pass --n-test K); {res.seconds:.1f}s; weights -> {args.out}")
    best = load_model(args.out)
    if test["n"]:  # the test MAE travels with the weights (fastcount models, evaluate)
        best.metadata.update(test_mae=f"{test['mae']:.4f}", test_rmse=f"{test['rmse']:.4f}", test_n=str(test["n"]))
    if args.bf16_calibrate > 0:

        names = res.split["train"][: args.bf16_calibrate]
        best.bf16_rounding = calibrate_bf16(best, [ds[i][0] for i in names], progress=not args.quiet)
        print(f"bf16 rounding calibrated on {len(names)} training images -> {args.out}")
    save_model(best, args.out, metadata=best.metadata)
    if args.plot:
        name = f"{ds.name} N={args.n_train} (test MAE {test['mae']:.2f})"
        print(f"learning curves -> {plot_learning_curves({name: res.history}, args.plot)}")
    return 0


def cmd_evaluate(args):

    ds = _dataset(args)
    if args.splits:
        r = run_protocol(ds, args.splits, _config(args), progress=not args.quiet)
        print(f"{ds.name} N={args.n_train}: test MAE {r['mean']:.2f} +- {r['std']:.2f} over {args.splits} splits")
        return 0

    device = resolve_device(args.device)
    model = load_model(args.weights, device=device)
    test_idx, source = _evaluation_images(ds, model.metadata, _test_arg(args), args.seed)
    r = evaluate(model, ds, test_idx, device)
    print(f"{ds.name}: test MAE {r['mae']:.3f}, RMSE {r['rmse']:.3f}, on {r['n']} images ({source})")
    return 0


def _describe_test(test, ds) -> str:
    if test is None:
        return f"last {ds.test_size}" if ds.test_size else "none (pass --n-test K)"
    return f"{test} images drawn with --seed" if isinstance(test, int) else f"{len(test)} named images"


def _evaluation_images(ds, meta: dict, test, seed: int):
    """The test images of ``ds`` for weights with metadata ``meta``: by default the split the
    weights recorded; never an image they were trained or validated on."""
    split = json.loads(meta["split"]) if "split" in meta else {}
    seen = set(split.get("train", []) + split.get("val", []))
    if "split" not in meta and "train_images" in meta:
        seen |= set(json.loads(meta["train_images"])) | set(json.loads(meta.get("val_images", "[]")))
    if test is None and split.get("test"):
        idx, source = held_out_indices(ds, split["test"]), "the test split recorded in the weights"
    else:
        idx = held_out_indices(ds, test, seed)
        source = "the reference test set" if test is None else "the requested test images"
    if not idx:
        raise ValueError(f"no held-out test images: the weights record no test split and {ds.name!r} has no "
                         "reference test set; pass --n-test K or --test-images NAMES")
    used = sorted(seen & {ds.names[i] for i in idx})
    if used:
        raise ValueError(f"{len(used)} of the test images were used to train or validate these weights "
                         f"({', '.join(used[:5])}); choose other --n-test/--seed or --test-images")
    return idx, source


def _count_kwargs(args) -> dict:
    return dict(tile=args.tile, batch_size=args.batch_size, device=args.device, backend=args.backend,
                precision=args.precision, workers=args.workers, progress=not args.quiet)


def _many_slides(args) -> bool:
    """Several slides (or options only they take): counted by ``fastcount.distributed``."""
    p = args.path
    return (len(p) > 1 or any(c in p[0] for c in "*?[") or p[0].lower().endswith(".txt")
            or any(v is not None for v in (args.out_dir, args.scheduler, args.summary, args.split)))


def cmd_count(args):

    mask = args.mask
    if mask == "none":
        mask = None
    elif mask != "auto":
        try:
            mask = read_image(mask).max(axis=2) > 0
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"--mask must be 'auto', 'none' or a mask image: {e}") from e
    if _many_slides(args):
        from .distributed import count_from_cli

        return count_from_cli(args, mask)
    args.path = args.path[0]
    res = count_slide(args.path, args.weights, level=args.level, mpp=args.mpp, mask=mask,
                      checkpoint=args.checkpoint, points=args.points is not None, **_count_kwargs(args))
    if args.points:
        res.to_csv(args.points)
    if args.heatmap:
        res.save_heatmap(args.heatmap, points=args.points is not None)
    if args.geojson:
        res.to_geojson(args.geojson, points=args.points is not None)
    st = res.stats
    if args.json:
        print(res.to_json(include_density=False))
    else:
        h, w = res.shape
        print(f"{args.path}: {res.total:.1f} objects ({w}x{h} px at level {res.level}; "
              f"{st['tiles_processed']} tiles counted, {st['tiles_skipped']} skipped as background; "
              f"{st['seconds']:.1f}s, {st['megapixels_per_s']:.3g} Mpx/s, peak RSS {st['peak_rss_mb']:.0f} MiB)")
    return 0


def cmd_demo(args):
    import tempfile
    from pathlib import Path

    import torch


    label = ""
    if args.weights is not None:
        model = load_model(args.weights)
    elif weights_io.default_weights_path().is_file():
        model = load_model(None)
    elif args.untrained:
        torch.manual_seed(args.seed)
        model = CountCeption(width=args.width).eval()
        label = " [UNTRAINED random model: this count is meaningless, it only shows the pipeline]"
    else:
        print("fastcount demo: no default weights are installed yet "
              f"(expected {weights_io.default_weights_path()}). Pass --weights W.safetensors, "
              "or --untrained to run the pipeline with a random, untrained model.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fastcount-demo-") as tmp:
        folder = Path(args.out) if args.out else Path(tmp)
        path = folder / f"synthetic_{args.size}_seed{args.seed}.tif"
        t0 = time.perf_counter()
        info = write_synthetic_slide(path, args.size, seed=args.seed, tissue_fraction=args.tissue_fraction,
                                     progress=not args.quiet)
        t_write = time.perf_counter() - t0
        res = count_slide(path, model, **_count_kwargs(args))
        res.save_heatmap(args.heatmap)
    st = res.stats
    truth = info["total"]
    print(f"synthetic slide {args.size}x{args.size} (written in {t_write:.1f}s"
          f"{', kept at ' + str(path) if args.out else ''})")
    print(f"count        {res.total:10.1f}{label}")
    print(f"ground truth {truth:10d}   (error {res.total - truth:+.1f}, {100 * (res.total - truth) / max(truth, 1):+.1f}%)")
    print(f"tiles        {st['tiles_processed']} counted, {st['tiles_skipped']} skipped as background "
          f"(mask: {st['mask'].get('kind')})")
    print(f"throughput   {st['megapixels_per_s']:.3f} Mpx/s counted, {st['slide_megapixels_per_s']:.3f} Mpx/s "
          f"of slide, {st['seconds']:.1f}s ({st['backend']} on {st['device']})")
    print(f"peak memory  {st['peak_rss_mb']:.0f} MiB RSS")
    print(f"heatmap      {args.heatmap}")
    return 0


def cmd_export(args):
    model = load_model(args.weights)
    path = export_onnx(model, args.onnx)
    g = model.geometry
    print(f"{path}: ONNX, BatchNorm folded, dynamic batch/height/width; patch {g.patch_size}, stride {g.stride}, "
          f"halo {g.halo_before}/{g.halo_after}, redundancy {g.redundancy}")
    return 0


def cmd_info(args):
    import torch


    print(f"fastcount {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"compiled ops: {'yes' if has_compiled_ops() else 'no (PyTorch reference)'}")
    weights = weights_io.default_weights_path()
    print(f"default weights: {weights if weights.is_file() else 'not installed'}")
    return 0


def cmd_models(args):

    for m in weights_io.packaged_models():
        mae = f"test MAE {m['test_mae']:.2f}" if m["test_mae"] is not None else "test MAE not recorded"
        state = m["path"] if m["installed"] else "not installed"
        print(f"{m['name']:5s} {m['data']}; {mae}; for {m['stain']}\n      {state}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "count": cmd_count, "demo": cmd_demo,
                "export": cmd_export, "info": cmd_info, "models": cmd_models}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"fastcount {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastcount {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
