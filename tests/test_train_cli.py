import numpy as np
import pytest
import torch

from fastcount import load_model
from fastcount.data import load_dataset
from fastcount.io import read_metadata
from fastcount.train import TrainConfig, evaluate, split_indices, train

from conftest import DATASETS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_vgg():
    ds = load_dataset("vgg_cells", DATASETS)
    return ds


def test_split_protocol():
    tr, va, te = split_indices(200, 100, 32, 32, seed=4)
    assert len(tr) == 32 and len(va) == 32 and te == list(range(100, 200))
    assert not set(tr) & set(va) and max(tr + va) < 100
    assert split_indices(200, 100, 32, 32, seed=4) == (tr, va, te)
    assert split_indices(200, 100, 32, 32, seed=5)[0] != tr
    with pytest.raises(ValueError, match="exceeds"):
        split_indices(44, 11, 20, 20, 0)


def test_training_smoke_and_resume(tmp_path, small_vgg):
    cfg = TrainConfig(n_train=2, n_val=1, epochs=1, crop=40, width=0.0625, batch_size=2, seed=0)
    out = tmp_path / "w.safetensors"
    logs = []
    res = train(small_vgg, cfg, out=out, progress=False, log=logs.append)
    assert out.is_file() and (tmp_path / "w.safetensors.ckpt").is_file()
    assert len(res.history) == 1 and np.isfinite(res.history[0]["train_loss"])
    assert "epoch 1/1" in logs[0] and "val_mae" in logs[0]
    meta = read_metadata(out)
    assert meta["config"]["width"] == 0.0625
    m = load_model(out)
    r = evaluate(m, small_vgg, [199])
    assert r["n"] == 1 and np.isfinite(r["mae"])
    # resume: a second epoch continues from the checkpoint, history grows
    logs2 = []
    res2 = train(small_vgg, cfg, out=out, resume=True, progress=False, log=logs2.append, epochs=2)
    assert "resumed" in logs2[0] and len(res2.history) == 2
    # a checkpoint of another run is refused, not silently mixed
    with pytest.raises(ValueError, match="different run"):
        train(small_vgg, cfg, out=out, resume=True, progress=False, log=logs2.append, epochs=3, seed=9)


def test_training_step_reduces_loss_on_fixed_batch(small_vgg):
    torch.manual_seed(0)
    cfg = TrainConfig(n_train=2, n_val=0, epochs=6, crop=48, width=0.125, batch_size=2, lr=3e-3, augment=False)
    res = train(small_vgg, cfg, progress=False, log=lambda s: None)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]


def test_train_bad_config(small_vgg):
    with pytest.raises(ValueError, match="epochs"):
        train(small_vgg, TrainConfig(epochs=0), progress=False)
    with pytest.raises(ValueError, match="crop"):
        train(small_vgg, TrainConfig(crop=-3), progress=False)
    with pytest.raises(TypeError, match="unknown training option"):
        train(small_vgg, TrainConfig(), progress=False, nonsense=1)


def test_recalibrate_bn_averages_the_given_batches():
    from fastcount import CountCeption
    from fastcount.train import recalibrate_bn

    torch.manual_seed(3)
    m = CountCeption(width=0.125).eval()
    batches = [torch.rand(2, 3, 37, 45) * 255, torch.rand(1, 3, 37, 45) * 255]
    first = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    conv = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    with torch.no_grad():  # the first BN sees conv1(x)
        pre = [conv(x) for x in batches]
    momentum = first.momentum
    w0 = {k: v.clone() for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_bn(m, iter(batches)) == 3
    # cumulative average over the two batches: the mean of the per-batch means
    exp_mean = (pre[0].mean((0, 2, 3)) + pre[1].mean((0, 2, 3))) / 2
    exp_var = (pre[0].var((0, 2, 3), unbiased=True) + pre[1].var((0, 2, 3), unbiased=True)) / 2
    assert torch.allclose(first.running_mean, exp_mean, rtol=1e-4, atol=1e-4)
    assert torch.allclose(first.running_var, exp_var, rtol=1e-4, atol=1e-3)
    assert first.momentum == momentum and not m.training  # settings restored
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in w0.items())  # weights untouched
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(m, [])


def test_cosine_schedule_and_config_checks(small_vgg):
    from fastcount.train import _lr_at

    cfg = TrainConfig(epochs=10, lr=1e-2, lr_schedule="cosine")
    lrs = [_lr_at(cfg, e) for e in range(10)]
    assert lrs[0] == pytest.approx(1e-2) and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 1e-4
    assert _lr_at(TrainConfig(lr=3e-3, lr_schedule="constant"), 7) == 3e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        train(small_vgg, TrainConfig(lr_schedule="step"), progress=False)
    with pytest.raises(ValueError, match="bn_recal"):
        train(small_vgg, TrainConfig(bn_recal=-1), progress=False)
    cfg = TrainConfig(n_train=2, n_val=1, epochs=2, crop=40, width=0.0625, batch_size=2, lr_schedule="cosine",
                      bn_recal=2)
    res = train(small_vgg, cfg, progress=False, log=lambda s: None)
    assert [h["lr"] for h in res.history] == pytest.approx([_lr_at(cfg, 0), _lr_at(cfg, 1)])
    assert TrainConfig().lr == 5e-3 and TrainConfig().lr_schedule == "cosine"  # the documented recipe


def test_plot_learning_curves_checks_input(tmp_path):
    from fastcount.plots import plot_learning_curves

    with pytest.raises(ValueError, match="non-empty"):
        plot_learning_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="val_mae"):
        plot_learning_curves({"a": [{"epoch": 1, "train_loss": 1.0}]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_head_init_starts_at_the_target_density(small_vgg):
    from fastcount import CountCeption
    from fastcount.ops import redundant_count
    from fastcount.train import init_head_from_targets

    torch.manual_seed(0)
    m = CountCeption(width=0.125)
    idx = [3, 17, 40]
    dots = [small_vgg[i][1] for i in idx]
    mean, std = init_head_from_targets(m, dots)
    t = torch.cat([torch.ops.fastcount.make_targets(torch.from_numpy(d), 32, 1).double().flatten() for d in dots])
    assert mean == pytest.approx(float(t.mean()), rel=1e-9) and std == pytest.approx(float(t.std(unbiased=False)), rel=1e-9)
    assert m.layers[-1].bn.bias.detach()[0].item() == pytest.approx(mean, rel=1e-6)
    # Train-mode BN: the untrained net's total count already matches the images' true total.
    x = torch.stack([torch.from_numpy(small_vgg[i][0]).permute(2, 0, 1).float() for i in idx])
    with torch.no_grad():
        pred = float(redundant_count(m(x), 32, 1).sum())
    truth = float(sum(d.sum() for d in dots))
    assert abs(pred - truth) < 0.25 * truth, (pred, truth)
    # and the default init is far off (what head_init fixes)
    m2 = CountCeption(width=0.125)
    with torch.no_grad():
        pred2 = float(redundant_count(m2(x), 32, 1).sum())
    assert abs(pred2 - truth) > 0.5 * truth, (pred2, truth)


def test_resume_is_bit_identical_to_a_straight_run(tmp_path, small_vgg, one_thread):
    """1 epoch + 1 resumed epoch == 2 straight epochs: weights, best model, optimizer, RNG, history."""
    from safetensors.torch import load_file

    cfg = TrainConfig(n_train=3, n_val=1, epochs=2, crop=40, width=0.0625, batch_size=2, seed=3, bn_recal=2)
    quiet = dict(progress=False, log=lambda s: None)
    straight = train(small_vgg, cfg, out=tmp_path / "a.safetensors", **quiet)
    train(small_vgg, cfg, out=tmp_path / "b.safetensors", epochs=1, **quiet)
    logs = []
    resumed = train(small_vgg, cfg, out=tmp_path / "b.safetensors", resume=True, progress=False, log=logs.append)
    assert "resumed" in logs[0] and "at epoch 1" in logs[0]
    # the checkpoints hold the last-epoch weights, the best weights, Adam's moments and the RNG
    ca, cb = load_file(tmp_path / "a.safetensors.ckpt"), load_file(tmp_path / "b.safetensors.ckpt")
    assert ca.keys() == cb.keys() and any(k.startswith("optim.") for k in ca) and "rng" in ca
    unequal = [k for k in ca if not torch.equal(ca[k], cb[k])]
    assert not unequal, unequal
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    untimed = [[{k: v for k, v in rec.items() if k != "seconds"} for rec in h] for h in (straight.history, resumed.history)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    assert (straight.best_epoch, straight.best_val_mae) == (resumed.best_epoch, resumed.best_val_mae)
