"""The run's pictures: the primary metric per round, and how often each group trained each layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedhello.records import RoundRecord


def layer_frequency(
    records: Sequence[RoundRecord], group_names: Sequence[str], num_layers: int
) -> np.ndarray:
    """[group, layer] = fraction of that group's client-rounds that trained the layer."""
    counts = np.zeros((len(group_names), num_layers))
    seen = np.zeros(len(group_names))
    index = {g: i for i, g in enumerate(group_names)}
    for r in records:
        for c in r.clients:
            g = index[c.group]
            seen[g] += 1
            counts[g, c.layers] += 1
    return counts / np.maximum(seen, 1)[:, None]


def plot_metric(
    records: Sequence[RoundRecord],
    metric: str,
    path: Path,
    title: str,
    baseline: float | None,
    baseline_label: str = "trivial baseline",
) -> None:
    """Validation and test values of `metric` per evaluated round, with the trivial baseline."""
    ev = [r for r in records if r.metric("test", metric) is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    rounds = [r.round for r in ev]

    def values(split: str) -> list[float]:
        return [float("nan") if (v := r.metric(split, metric)) is None else v for r in ev]

    ax.plot(rounds, values("val"), "o-", label="validation")
    ax.plot(rounds, values("test"), "s-", label="test")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label=baseline_label)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " "))
    if metric in ("accuracy", "macro_f1"):
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


def plot_fisher_scores(records: Sequence[RoundRecord], path: Path, title: str) -> bool:
    """Each layer's Fisher score at every refresh (log scale); False when the run had none."""
    refreshes = [r.extras["fisher"] for r in records if "fisher" in r.extras]
    if not refreshes:
        return False
    scores = np.array([[np.nan if x is None else x for x in f["scores"]] for f in refreshes], dtype=float)
    rounds = [f["round"] for f in refreshes]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    cmap = plt.get_cmap("viridis", scores.shape[1])
    for layer in range(scores.shape[1]):
        ax.plot(rounds, scores[:, layer], "o-", color=cmap(layer), label=f"layer {layer}")
    if (scores > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("round of refresh")
    ax.set_ylabel("Fisher layer score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_layer_counts(records: Sequence[RoundRecord], num_layers: int, path: Path, title: str) -> None:
    """How many client-rounds trained each layer, over the whole run."""
    counts = np.zeros(num_layers, dtype=int)
    for r in records:
        for c in r.clients:
            counts[c.layers] += 1
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * num_layers + 2), 3.4))
    ax.bar(range(num_layers), counts, color="tab:blue")
    ax.set_xticks(range(num_layers), [str(i) for i in range(num_layers)])
    ax.set_xlabel("layer (0 = input side)")
    ax.set_ylabel("client-rounds trained")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
