"""Learning-curve pictures for training runs (matplotlib, an optional dependency)."""
from __future__ import annotations

from pathlib import Path

from .files import atomic_path

__all__ = ["plot_learning_curves"]


def plot_learning_curves(histories: dict, path, title: str | None = None, references: dict | None = None) -> Path:
    """Draw train L1 loss and validation count MAE per epoch for one or more runs.

    Args:
        histories: ``{run name: history}`` where a history is the list of per-epoch
            dicts that ``fastcount.train.train`` returns (``epoch``, ``train_loss``,
            ``val_mae``, optionally ``lr``).
        path: PNG to write (written atomically).
        title: figure title.
        references: ``{label: MAE}`` drawn as horizontal lines on the MAE panel
            (e.g. the paper's test MAE).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_learning_curves needs matplotlib: pip install matplotlib") from e
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty {name: history} dict")
    for name, h in histories.items():
        if not h or not all("epoch" in r and "train_loss" in r and "val_mae" in r for r in h):
            raise ValueError(f"history {name!r} must be a non-empty list of dicts with epoch, train_loss, val_mae")
    path = Path(path)
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, h in histories.items():
        ep = [r["epoch"] for r in h]
        (line,) = ax_l.plot(ep, [r["train_loss"] for r in h], lw=1.2, label=name)
        val = [r["val_mae"] for r in h]
        ax_v.plot(ep, val, lw=1.0, color=line.get_color(), alpha=0.8, label=name)
        best = min(range(len(val)), key=val.__getitem__)
        ax_v.plot([ep[best]], [val[best]], "o", color=line.get_color(), ms=5)
    for label, mae in (references or {}).items():
        ax_v.axhline(mae, ls="--", lw=0.9, color="0.4")
        ax_v.annotate(label, (ax_v.get_xlim()[0], mae), textcoords="offset points", xytext=(4, 3), fontsize=8,
                      color="0.3")
    ax_l.set(xlabel="epoch", ylabel="train L1 loss (per pixel)", title="training loss")
    ax_v.set(xlabel="epoch", ylabel="validation count MAE (cells / image)", title="validation MAE (dot: best)")
    ax_v.set_yscale("log")
    for ax in (ax_l, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
