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
