"""Training and the evaluation protocol of the paper.

Protocol (Lempitsky & Zisserman 2010, as in the paper): the reference test
set (VGG cells: last 100 images, MBM: last 11) is never trained or validated
on; from the rest a seeded random split takes ``n_train`` training and
``n_val`` validation images. Loss: mean pixel-wise L1 between predicted and
target count maps. Adam. The model with the best validation count MAE wins.

Random crops (``crop``) cut the cost of a step roughly in proportion to the
crop's area (plus the r-pixel border the output adds); the network still
sees every part of every image over the epochs, but each step sees less
context and more of the zero-padded border, so short runs with small crops
generalise a little worse. Flips and 90-degree rotations are applied too.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .inference import compile as compile_backend
from .inference.fft import use_fft_convs
from .io import load_model, save_model
from .model import CountCeption
from .pixels import image_to_tensor
from .ops import make_targets, redundant_count
from .devices import resolve_device
from .files import atomic_path

__all__ = ["TrainConfig", "TrainResult", "split_indices", "held_out_indices", "load_init_weights", "recalibrate_bn", "init_head_from_targets", "train", "evaluate", "predict_counts", "run_protocol"]


@dataclass
class TrainConfig:
    n_train: int = 32
    n_val: int = 32
    epochs: int = 100
    crop: int | None = None
    width: float = 1.0
    batch_size: int = 4
    lr: float = 5e-3  # the paper's; 1e-3 barely moves in the first hundred steps
    seed: int = 0
    patch_size: int = 32
    stride: int = 1
    augment: bool = True
    device: str = "cpu"
    # CPU speed-up: run the two large convs by FFT (same math and parameters).
    fft: bool = False
    # "cosine" anneals lr to 1% of ``lr`` over the run; late epochs then change the weights
    # little, so the BN running statistics (and the validation MAE) settle.
    lr_schedule: str = "cosine"
    # Before each validation, re-estimate the BN statistics as a plain average over this many
    # training inputs (crops, as trained) instead of the noisy momentum-0.1 average of the
    # last few batches of 4, which swung the validation MAE between 3 and 30 at lr 5e-3.
    bn_recal: int = 32
    # Start the output BN at the training targets' per-pixel mean and std. With the default
    # init (beta 0, gamma 1) Adam needs hundreds of steps just to lift the output to the
    # mean count density (the "predicts half the count" phase of early training).
    head_init: bool = True

    # Held-out test set: None = the dataset's reference test set (VGG last 100, MBM last 11,
    # none for a folder); an int K = K images drawn with ``seed``; a list = those image names.
    test: int | list | None = None
    # Start from saved weights: "default" (the packaged VGG model), a packaged model name
    # ("vgg", "mbm") or a weights path. Receptive field, stride and width must match.
    init: str | None = None

    def check(self):
        if self.test is not None and not (
                (isinstance(self.test, int) and not isinstance(self.test, bool) and self.test >= 0)
                or (isinstance(self.test, (list, tuple)) and all(isinstance(t, str) for t in self.test))):
            raise ValueError(f"test must be None, an int >= 0 or a list of image names, got {self.test!r}")
        if self.init is not None and not isinstance(self.init, str):
            raise ValueError(f"init must be None, 'default', a model name or a weights path, got {self.init!r}")
        for name in ("n_train", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.n_val, int) or self.n_val < 0:
            raise ValueError(f"n_val must be a non-negative int, got {self.n_val!r}")
        if self.crop is not None and (not isinstance(self.crop, int) or self.crop < 1):
            raise ValueError(f"crop must be a positive int or None, got {self.crop!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.fft, bool):
            raise ValueError(f"fft must be a bool, got {self.fft!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not isinstance(self.head_init, bool):
            raise ValueError(f"head_init must be a bool, got {self.head_init!r}")
        if not isinstance(self.bn_recal, int) or self.bn_recal < 0:
            raise ValueError(f"bn_recal must be a non-negative int, got {self.bn_recal!r}")


@dataclass
class TrainResult:
    model: CountCeption
    best_val_mae: float
    best_epoch: int
    history: list = field(default_factory=list)
    split: dict = field(default_factory=dict)
    seconds: float = 0.0


def split_indices(n_total: int, test_size: int, n_train: int, n_val: int, seed: int, test=None):
    """Seeded random train/val split of the images outside the held-out test set.

    The test set is the last ``test_size`` images, or the indices ``test`` when given.
    """
    if test is None:
        test = list(range(n_total - test_size, n_total))
    test = sorted(int(i) for i in test)
    held = set(test)
    rest = [i for i in range(n_total) if i not in held]
    pool = len(rest)
    if n_train + n_val > pool:
        raise ValueError(
            f"n_train + n_val = {n_train + n_val} exceeds the {pool} images outside the held-out test set "
            f"({n_total} images, {len(test)} reserved for testing)"
        )
    perm = np.random.default_rng(seed).permutation(pool)
    pick = lambda p: sorted(rest[i] for i in p.tolist())  # noqa: E731
    return pick(perm[:n_train]), pick(perm[n_train : n_train + n_val]), test


def held_out_indices(dataset, test=None, seed: int = 0) -> list[int]:
    """The held-out test images of ``dataset``: None = its reference test set (the last
    ``dataset.test_size``); an int K = K images drawn with ``seed`` (the same K for the same
    seed and dataset size); a list of image names = those images."""
    n = len(dataset)
    if test is None:
        return list(range(n - dataset.test_size, n))
    if isinstance(test, int):
        if not 0 <= test < n:
            raise ValueError(f"n_test must be in [0, {n}) for a dataset of {n} images, got {test}")
        # its own stream, so the test draw does not move with n_train / n_val
        return sorted(np.random.default_rng([seed, 7919]).permutation(n)[:test].tolist())
    where = {name: i for i, name in enumerate(dataset.names)}
    missing = [t for t in test if t not in where]
    if missing:
        raise ValueError(f"test images not in the dataset: {missing[:5]} (it holds e.g. {dataset.names[:3]})")
    return sorted(where[t] for t in test)


def _to_tensor_image(img: np.ndarray) -> torch.Tensor:
    return image_to_tensor(img)[0]


@torch.inference_mode()
def predict_counts(model: CountCeption, images, device="cpu", batch_size: int = 4, backend: str = "eager") -> np.ndarray:
    """Counts for a list of HxWx3 images (batched when shapes agree).

    ``backend`` as in ``fastcount.inference.compile`` (fp32): "eager" is the reference,
    "auto" the fast path (CPU: about 3.5x faster, map relative error ~1e-5).
    """
    device = resolve_device(device)
    was = model.training
    model.eval()
    out = []
    if backend != "eager":
        run = compile_backend(model, backend, device=device)
    else:
        run = model
    try:
        i = 0
        while i < len(images):
            j = i + 1
            while j < len(images) and j - i < batch_size and images[j].shape == images[i].shape:
                j += 1
            x = torch.stack([_to_tensor_image(im) for im in images[i:j]]).to(device)
            c = redundant_count(run(x), model.patch_size, model.stride)
            out.extend(c.reshape(-1).cpu().tolist())
            i = j
    finally:
        model.train(was)
    return np.array(out, dtype=np.float64)


def evaluate(model: CountCeption, dataset, indices=None, device="cpu", batch_size: int = 4,
             backend: str = "eager") -> dict:
    """Count MAE (and more) of ``model`` on ``dataset[indices]`` (all when None)."""
    idx = range(len(dataset)) if indices is None else indices
    images = [dataset[i][0] for i in idx]
    truth = np.array([float(dataset[i][1].sum()) for i in idx])
    pred = predict_counts(model, images, device, batch_size, backend)
    err = pred - truth
    return {
        "mae": float(np.abs(err).mean()) if len(err) else float("nan"),
        "rmse": float(np.sqrt((err**2).mean())) if len(err) else float("nan"),
        "mean_rel_error": float((np.abs(err) / np.maximum(truth, 1)).mean()) if len(err) else float("nan"),
        "n": len(err),
        "pred": pred.tolist(),
        "truth": truth.tolist(),
    }


def _batch(dataset, idx, cfg: TrainConfig, gen: torch.Generator):
    """Random crops (+ flips/rotations) of the images ``idx`` and their targets."""
    xs, ds = [], []
    for i in idx:
        img, dots = dataset[i]
        h, w = dots.shape
        if cfg.crop is not None and (h > cfg.crop or w > cfg.crop):
            ch, cw = min(cfg.crop, h), min(cfg.crop, w)
            y = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            x = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            img, dots = img[y : y + ch, x : x + cw], dots[y : y + ch, x : x + cw]
        t_img = _to_tensor_image(img)
        t_dots = torch.from_numpy(np.ascontiguousarray(dots)).to(torch.int64)
        if cfg.augment:
            k = int(torch.randint(0, 4, (1,), generator=gen))
            flip = bool(torch.randint(0, 2, (1,), generator=gen))
            if t_img.shape[-1] != t_img.shape[-2]:
                k = 2 * (k % 2)  # keep the shape batchable for non-square crops
            t_img, t_dots = torch.rot90(t_img, k, (1, 2)), torch.rot90(t_dots, k, (0, 1))
            if flip:
                t_img, t_dots = t_img.flip(-1), t_dots.flip(-1)
        xs.append(t_img)
        ds.append(t_dots)
    if len({tuple(x.shape) for x in xs}) > 1:
        raise ValueError("training images differ in size; pass crop=C to train on equal-size crops")
    dots = torch.stack(ds)
    return torch.stack(xs), make_targets(dots, cfg.patch_size, cfg.stride).unsqueeze(1)


@torch.no_grad()
def init_head_from_targets(model: CountCeption, dot_maps) -> tuple[float, float]:
    """Set the last BN's shift/scale to the per-pixel mean/std of the targets of ``dot_maps``.

    The output is LeakyReLU(gamma * z + beta) with z ~ N(0, 1) at the start, so the first
    predictions then match the target density instead of ~0.4 counts per pixel.
    Returns (mean, std).
    """
    total, sq, n = 0.0, 0.0, 0
    for d in dot_maps:
        t = make_targets(torch.as_tensor(np.ascontiguousarray(d), dtype=torch.int64), model.patch_size,
                         model.stride).to(torch.float64)
        total, sq, n = total + float(t.sum()), sq + float((t * t).sum()), n + t.numel()
    if n == 0:
        raise ValueError("dot_maps is empty")
    mean = total / n
    std = math.sqrt(max(sq / n - mean * mean, 0.0)) or 1.0
    bn = model.layers[-1].bn
    bn.bias.fill_(mean)
    bn.weight.fill_(std)
    return mean, std


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    if cfg.lr_schedule == "cosine":
        return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs)))
    return cfg.lr


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, batches) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches``.

    ``batches``: an iterable of NCHW input tensors. Runs a train-mode forward (no
    gradient) with the BN momentum set to cumulative averaging; weights are untouched.
    Feed inputs from the training distribution (the same crops): the eval-mode BN is
    then the affine the trained layers expect, so a full image is processed like the
    crops were. (Statistics of full images instead shift every layer's normalisation
    and bias the count: an MBM model undercounted by 25 cells per image that way.)
    Returns the number of images used.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was, momenta = model.training, [m.momentum for m in bns]
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches below
        model.train()
        for x in batches:
            model(x)
            n += x.shape[0]
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was)
    if bns and n == 0:
        raise ValueError("recalibrate_bn needs at least one batch")
    return n


def _recal_batches(dataset, train_idx, cfg: TrainConfig, epoch: int, device):
    """``cfg.bn_recal`` training inputs (crops + augmentation as in training), seeded per epoch."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(train_idx), generator=gen).tolist()
    picks = [train_idx[order[i % len(order)]] for i in range(cfg.bn_recal)]
    for b in range(0, len(picks), cfg.batch_size):
        x, _ = _batch(dataset, picks[b : b + cfg.batch_size], cfg, gen)
        yield x.to(device)


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, model, best_state, opt, gen, meta: dict):
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    meta = dict(meta, param_groups=osd["param_groups"])
    with atomic_path(path) as tmp:  # an interrupted save keeps the previous checkpoint
        save_file(tensors, str(tmp), metadata={"fastcount_checkpoint": json.dumps(meta)})


def _load_checkpoint(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["fastcount_checkpoint"])
    t = load_file(str(path))
    model = {k[6:]: v for k, v in t.items() if k.startswith("model.")}
    best = {k[5:]: v for k, v in t.items() if k.startswith("best.")}
    state = {}
    for k, v in t.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    return model, best, {"state": state, "param_groups": meta.pop("param_groups")}, t["rng"], meta


# --------------------------------------------------------------------------- training


def load_init_weights(model: CountCeption, init: str) -> str:
    """Copy the weights ``init`` names ("default", "vgg", "mbm" or a path) into ``model``.

    The receptive field (patch size), stride and width must match; the error says which differ.
    Returns ``init``.
    """
    src = load_model(None if init == "default" else init)  # load_model knows the packaged names
    path = init
    mine, theirs = model.config, src.config
    diff = [f"{k} {theirs[k]} (init) vs {mine[k]} (this run)" for k in ("patch_size", "stride", "width", "in_channels")
            if float(theirs[k]) != float(mine[k])]
    if diff:
        raise ValueError(f"init weights {path} do not fit this model: " + ", ".join(diff)
                         + "; train with the same --width/--stride, or start from scratch")
    model.load_state_dict(src.state_dict())
    return str(path)



def train(dataset, config: TrainConfig | None = None, *, out=None, checkpoint=None, resume: bool = False,
          progress: bool = True, log=print, **overrides) -> TrainResult:
    """Train a CountCeption on ``dataset`` with the paper's protocol.

    Args:
        dataset: a ``DotDataset`` (its ``test_size`` last images are held out).
        config: a TrainConfig; keyword ``overrides`` replace its fields.
        out: where to write the best model (safetensors), optional.
        checkpoint: resumable checkpoint path (default ``<out>.ckpt`` when out is given).
        resume: continue from ``checkpoint`` if it exists.
    """
    cfg = _replace(config, overrides)
    cfg.check()
    device = resolve_device(cfg.device)
    train_idx, val_idx, test_idx = split_indices(len(dataset), dataset.test_size, cfg.n_train, cfg.n_val, cfg.seed,
                                                 test=held_out_indices(dataset, cfg.test, cfg.seed))
    split = {"train": train_idx, "val": val_idx, "test": test_idx}
    if checkpoint is None and out is not None:
        checkpoint = Path(str(out) + ".ckpt")
    checkpoint = Path(checkpoint) if checkpoint is not None else None

    torch.manual_seed(cfg.seed)
    model = CountCeption(3, cfg.patch_size, cfg.stride, cfg.width).to(device)
    if cfg.fft:  # FFT for the large convs; parameters (and state-dict keys) are shared
        use_fft_convs(model)
    if cfg.init is not None:
        load_init_weights(model, cfg.init)
    if cfg.head_init:  # also when fine-tuning: only the output scale moves to the new targets' density
        init_head_from_targets(model, [dataset[i][1] for i in train_idx])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_state = copy.deepcopy(model.state_dict())
    best_mae, best_epoch, start_epoch, history, elapsed = float("inf"), 0, 0, [], 0.0
    run_id = {k: v for k, v in vars(cfg).items() if k not in ("epochs", "device", "fft")}
    for k in ("test", "init"):  # unset: the run id of a checkpoint written before these options existed
        if run_id[k] is None:
            del run_id[k]
    run_id["dataset"] = dataset.name

    if resume and checkpoint is not None and checkpoint.is_file():
        m, b, o, rng, meta = _load_checkpoint(checkpoint)
        if meta["run"] != json.loads(json.dumps(run_id)):
            raise ValueError(f"checkpoint {checkpoint} belongs to a different run: {meta['run']} != {run_id}")
        model.load_state_dict(m)
        best_state = b
        opt.load_state_dict(o)
        gen.set_state(rng)
        best_mae, best_epoch, start_epoch = meta["best_mae"], meta["best_epoch"], meta["epoch"]
        history, elapsed = meta["history"], meta["seconds"]
        log(f"resumed from {checkpoint} at epoch {start_epoch} (best val MAE {best_mae:.3f} at epoch {best_epoch})")

    n_batches = math.ceil(len(train_idx) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * n_batches, initial=start_epoch * n_batches, disable=not progress,
               desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, epoch)
            order = torch.randperm(len(train_idx), generator=gen).tolist()
            losses = []
            for b in range(n_batches):
                idx = [train_idx[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
                x, t = _batch(dataset, idx, cfg, gen)
                x, t = x.to(device), t.to(device)
                loss = torch.nn.functional.l1_loss(model(x), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", best_val=f"{best_mae:.2f}")
            if cfg.bn_recal:
                recalibrate_bn(model, _recal_batches(dataset, train_idx, cfg, epoch, device))
            # Validation only ranks epochs, so it may use the fast path; the test MAE uses eager.
            val = evaluate(model, dataset, val_idx, device, backend="auto") if val_idx else {"mae": float(np.mean(losses))}
            rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_mae": val["mae"],
                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            history.append(rec)
            if val["mae"] < best_mae:
                best_mae, best_epoch = val["mae"], epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            line = (f"epoch {epoch + 1}/{cfg.epochs}  train_loss {rec['train_loss']:.4f}  "
                    f"val_mae {val['mae']:.3f}  best {best_mae:.3f} (epoch {best_epoch})  {rec['seconds']:.1f}s")
            (bar.write if (progress and log is print) else log)(line)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, model, best_state, opt, gen, {
                    "run": run_id, "epoch": epoch + 1, "best_mae": best_mae, "best_epoch": best_epoch,
                    "history": history, "seconds": rec["seconds"]})
    finally:
        bar.close()

    model.load_state_dict(best_state)
    if cfg.fft:  # hand back a plain CountCeption
        use_fft_convs(model, False)
    model.eval()
    result = TrainResult(model, best_mae, best_epoch, history, split, time.perf_counter() - t0)
    if out is not None:
        save_model(model, out, metadata={
            "dataset": dataset.name, "best_val_mae": best_mae, "best_epoch": best_epoch,
            "train_config": {k: v for k, v in vars(cfg).items()}, "split_seed": cfg.seed,
            "train_images": [dataset.names[i] for i in train_idx],
            "split": {k: [dataset.names[i] for i in v] for k, v in split.items()}})
    return result


def _replace(config, overrides):
    cfg = copy.copy(config or TrainConfig())
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown training option {k!r}")
        setattr(cfg, k, v)
    return cfg


def run_protocol(dataset, splits: int, config: TrainConfig | None = None, progress=True, log=print, **overrides):
    """Train and test ``splits`` times (seeds seed, seed+1, ...); test MAE mean +- std."""
    base = _replace(config, overrides)
    maes = []
    for k in range(splits):
        cfg = _replace(base, {"seed": base.seed + k})
        res = train(dataset, cfg, progress=progress, log=log)
        test = evaluate(res.model, dataset, res.split["test"], cfg.device)
        maes.append(test["mae"])
        log(f"split {k + 1}/{splits} (seed {cfg.seed}): val MAE {res.best_val_mae:.3f}, test MAE {test['mae']:.3f}")
    maes = np.array(maes)
    return {"maes": maes.tolist(), "mean": float(maes.mean()), "std": float(maes.std(ddof=1)) if len(maes) > 1 else 0.0}
