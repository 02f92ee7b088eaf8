"""Run plots from plain data (dicts, arrays or CPU/GPU tensors), as matplotlib Figures for PNG artifacts.

Built on ``matplotlib.figure.Figure`` directly, not pyplot: no global figure registry and no GUI backend, so
concurrent trials in one process cannot draw on each other's figures and nothing needs closing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure


def robustness_curves(curves: Mapping[str, Mapping[float, float]], clean_acc: float | None = None,
                      title: str = "Robust accuracy", xlabel: str = "ε") -> Figure:
    """Accuracy vs ε, one line per attack label ({label: {eps: acc}}); ``worst_case`` drawn bold, clean
    accuracy (if given) as the ε = 0 point of every line. NaN points (attack not run at that ε) are skipped.
    Any other x works as well, e.g. GCE's α ({"ε=0.3": {alpha: acc}}, ``xlabel="GCE α"``)."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for label, by_eps in curves.items():
        points = sorted((float(e), float(a)) for e, a in by_eps.items() if not math.isnan(float(a)))
        if clean_acc is not None:
            points = [(0.0, float(clean_acc)), *[p for p in points if p[0] != 0.0]]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        worst = label.startswith("worst_case")
        ax.plot(xs, ys, marker="o", label=label, linewidth=2.5 if worst else 1.2,
                color="black" if worst else None, zorder=3 if worst else 2)
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[tuple[float, float, str]], xlabel: str = "val clean accuracy",
                 ylabel: str = "val worst-case robust accuracy", title: str = "Clean vs robust accuracy") -> Figure:
    """(clean, robust, label) of every run, one colour per label; the non-dominated points joined as the front."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for label in dict.fromkeys(p[2] for p in points):
        xs, ys = zip(*[(p[0], p[1]) for p in points if p[2] == label], strict=True)
        ax.scatter(xs, ys, label=label, alpha=0.8)
    front = sorted((p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points)),
                   key=lambda p: p[0])
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def confusion_matrix(matrix, class_names: Sequence[str] | None = None, normalize: bool = True,
                     title: str = "Confusion matrix") -> Figure:
    """A K×K matrix (rows: true class, columns: predicted), row-normalised by default so that rare classes are
    readable; counts are written in the cells when K ≤ 20."""
    counts = _array(matrix).astype(float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be K x K, got shape {counts.shape}")
    k = counts.shape[0]
    shown = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalize else counts
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    size = min(3 + 0.45 * k, 14)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(names, rotation=90 if k > 10 else 0)
    ax.set_yticklabels(names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{counts[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
    fig.tight_layout()
    return fig


def embedding_scatter(coords, labels, class_names: Sequence[str] | None = None,
                      title: str = "Penultimate features (2-D)") -> Figure:
    """An N×2 embedding coloured by class: tight, separated clusters are the GCE paper's argument."""
    xy, y = _array(coords).astype(float), _array(labels).astype(int).ravel()
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) != len(y):
        raise ValueError(f"need coords (N, 2) and labels (N,), got {xy.shape} and {y.shape}")
    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.add_subplot()
    classes = np.unique(y)
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
        name = class_names[c] if class_names is not None else str(c)
        ax.scatter(xy[y == c, 0], xy[y == c, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=name)
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(markerscale=3, fontsize="small", loc="best", ncol=2 if len(classes) > 10 else 1)
    fig.tight_layout()
    return fig


def adversarial_grid(clean, adversarial, labels, clean_preds=None, adv_preds=None, max_images: int = 8,
                     title: str = "Clean (top), adversarial (middle), perturbation ×amplified (bottom)") -> Figure:
    """Clean and adversarial images (N, C, H, W) in [0, 1] side by side with their perturbation, titled with
    label and predictions, so a reader can see what the attack changed and whether it fooled the model."""
    x, x_adv = _array(clean)[:max_images], _array(adversarial)[:max_images]
    if x.shape != x_adv.shape or x.ndim != 4:
        raise ValueError(f"need clean and adversarial batches of the same (N, C, H, W) shape, "
                         f"got {x.shape} and {x_adv.shape}")
    y = _array(labels).ravel()[: len(x)]
    preds = [None if p is None else _array(p).ravel()[: len(x)] for p in (clean_preds, adv_preds)]
    delta = x_adv - x
    scale = float(np.abs(delta).max()) or 1.0
    n = len(x)
    fig = Figure(figsize=(1.4 * n + 0.4, 4.6), dpi=100)
    axes = fig.subplots(3, n, squeeze=False)
    for i in range(n):
        rows = (x[i], x_adv[i], 0.5 + 0.5 * delta[i] / scale)
        for r, img in enumerate(rows):
            ax = axes[r][i]
            img = np.clip(img.transpose(1, 2, 0), 0, 1)
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        p_clean, p_adv = (int(p[i]) if p is not None else "?" for p in preds)
        axes[0][i].set_title(f"y={int(y[i])} ŷ={p_clean}", fontsize=8)
        fooled = p_adv != "?" and p_adv != int(y[i])
        axes[1][i].set_title(f"ŷ={p_adv}", fontsize=8, color="red" if fooled else "black")
    fig.suptitle(f"{title}; max |δ| = {scale:.3g}", fontsize=9)
    # Fixed margins: tight_layout over 3·n image axes without tick labels costs more than drawing them.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.88, wspace=0.08, hspace=0.3)
    return fig


def png(fig: Figure, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes cropped to what is drawn, e.g. to embed in a report."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save(fig: Figure, path: Path | str) -> Path:
    """Write ``fig`` as a PNG (the Agg renderer, whatever the default backend)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _array(x) -> np.ndarray:
    """numpy from arrays, lists or torch tensors (any device or dtype) without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
    return np.asarray(x)


def main_effects(panels: Mapping[str, Sequence[tuple[str, float, float, float]]], ylabel: str = "objective",
                 title: str = "Main effects (mean, 95% CI)") -> Figure:
    """One panel per factor ({factor: [(level, mean, low, high)]}), levels in the given order, on one shared
    y axis so that the factors' effects compare by eye. NaN bounds (one observation) draw the point alone."""
    n = max(len(panels), 1)
    fig = Figure(figsize=(min(2.2 + 2.4 * n, 16), 3.8), dpi=100)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, (factor, levels) in zip(axes, panels.items(), strict=False):
        xs = np.arange(len(levels))
        means = np.array([m for _, m, _, _ in levels], dtype=float)
        low = np.array([m - lo if math.isfinite(lo) else 0.0 for _, m, lo, _ in levels])
        high = np.array([hi - m if math.isfinite(hi) else 0.0 for _, m, _, hi in levels])
        ax.errorbar(xs, means, yerr=[low, high], fmt="o-", capsize=4, color="C0")
        ax.set_xticks(xs)
        ax.set_xticklabels([lv for lv, *_ in levels], rotation=30 if len(levels) > 3 else 0, ha="right"
                           if len(levels) > 3 else "center", fontsize=8)
        ax.set_title(factor, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def interaction_lines(lines: Mapping[str, Mapping[float, tuple[float, float, float]]], xlabel: str = "ε",
                      ylabel: str = "objective", title: str = "Interaction") -> Figure:
    """One line per level of the first factor ({level: {x: (mean, low, high)}}) with its 95% band: lines that
    stay parallel mean no interaction, lines that converge or cross mean the gain depends on x."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(lines.items()):
        xs = sorted(points)
        mean, low, high = (np.array([points[x][j] for x in xs], dtype=float) for j in range(3))
        ax.plot(xs, mean, marker="o", label=label, color=f"C{i % 10}")
        ok = np.isfinite(low) & np.isfinite(high)
        if ok.any():
            ax.fill_between(np.array(xs)[ok], low[ok], high[ok], alpha=0.2, color=f"C{i % 10}", linewidth=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def parallel_coordinates(axes: Mapping[str, Sequence[str]], rows: Sequence[Sequence[str]], values: Sequence[float],
                         label: str = "objective", title: str = "Factors → objective") -> Figure:
    """One line per observation through its level on every factor axis ({factor: ordered levels}; ``rows``:
    each observation's levels in that order) to its objective on the last axis, coloured by the objective."""
    names = [*axes, label]
    values = np.asarray(values, dtype=float)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    span = hi - lo or 1.0
    fig = Figure(figsize=(min(3 + 1.8 * len(names), 16), 4.5), dpi=100)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]

    def position(levels: Sequence[str], level: str) -> float:
        return levels.index(level) / (len(levels) - 1) if len(levels) > 1 and level in levels else 0.5

    order = np.argsort(values)  # the best drawn last, on top
    for i in order:
        ys = [position(levels, rows[i][j]) for j, levels in enumerate(axes.values())]
        ys.append((values[i] - lo) / span)
        ax.plot(range(len(names)), ys, color=cmap((values[i] - lo) / span), alpha=0.6, linewidth=1)
    for j, levels in enumerate(axes.values()):
        ax.axvline(j, color="black", linewidth=0.8)
        for level in levels:
            ax.text(j + 0.03, position(levels, level), level, fontsize=7, va="center")
    ax.axvline(len(names) - 1, color="black", linewidth=0.8)
    for frac in (0.0, 0.5, 1.0):
        ax.text(len(names) - 1 + 0.03, frac, f"{lo + frac * span:.3g}", fontsize=7, va="center")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.1, len(names) - 0.6)
    ax.set_ylim(-0.08, 1.08)
    ax.set_title(title)
    fig.tight_layout()
    return fig
