"""The run's pictures: accuracy per round, and how often each group trained each layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def layer_frequency(
    records: Sequence[dict[str, Any]], group_names: Sequence[str], num_layers: int
) -> np.ndarray:
    """[group, layer] = fraction of that group's client-rounds that trained the layer."""
    counts = np.zeros((len(group_names), num_layers))
    seen = np.zeros(len(group_names))
    index = {g: i for i, g in enumerate(group_names)}
    for r in records:
        for c in r["clients"]:
            g = index[c["group"]]
            seen[g] += 1
            counts[g, c["layers"]] += 1
    return counts / np.maximum(seen, 1)[:, None]


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path, title: str, majority: float | None) -> None:
    ev = [r for r in records if r.get("test_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([r["round"] for r in ev], [r["val_accuracy"] for r in ev], "o-", label="validation")
    ax.plot([r["round"] for r in ev], [r["test_accuracy"] for r in ev], "s-", label="test")
    if majority is not None:
        ax.axhline(majority, color="grey", ls="--", lw=1, label="majority class")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_heatmap(freq: np.ndarray, group_names: Sequence[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * freq.shape[1] + 2), 0.6 * len(group_names) + 1.6))
    im = ax.imshow(freq, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(freq.shape[1]), [str(i) for i in range(freq.shape[1])])
    ax.set_yticks(range(len(group_names)), list(group_names))
    ax.set_xlabel("layer (0 = input side)")
    ax.set_title(title)
    for (g, layer), v in np.ndenumerate(freq):
        ax.text(layer, g, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="fraction of client-rounds trained")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
