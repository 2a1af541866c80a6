"""The two pictures a fit leaves in its run folder: a confusion matrix and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_paths

MAX_LABELLED_CLASSES = 40  # beyond this, tick labels overlap into a grey smear


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_paths(path) as (tmp,):
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> None:
    """Rows are true classes, columns predictions; colour is the row's share, text the count."""
    plt = _pyplot()
    k = len(classes)
    shares = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    side = min(16.0, max(4.0, 0.45 * k + 2))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0)
        ax.set_yticks(range(k), classes)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    _save(fig, path)


def curves(history: Sequence[dict], path: Path) -> None:
    """Loss and accuracy per epoch, training against validation; the best epoch marked."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    acc_ax.plot(epochs, [h["train_acc"] for h in history], label="train")
    acc_ax.plot(epochs, [h["val_acc"] for h in history], label="validation")
    best = max(history, key=lambda h: h["val_acc"]) if history else None
    if best is not None:
        acc_ax.axvline(best["epoch"], color="grey", linestyle=":", label=f"best (epoch {best['epoch']})")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)
