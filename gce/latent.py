"""Latent-cluster metrics of penultimate features, and the confusion matrix.

The GCE paper (Chen et al. 2019, https://arxiv.org/abs/1903.09799) argues that GCE tightens class clusters
in the penultimate layer: ``latent_clusters`` measures that (silhouette, inter/intra-class distance ratio)
and gives a 2-D PCA embedding for a plot. Everything here is plain torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gce.attacks import eval_mode
from gce.evaluate import batches, model_device
from gce.metrics import LATENT, latent_key

__all__ = ["ClusterMetrics", "Embedding", "class_separation", "confusion_matrix", "latent_clusters",
           "pca_embedding", "penultimate_features", "silhouette_score"]


@dataclass
class Embedding:
    """2-D PCA coordinates of penultimate features, with labels, for a scatter plot coloured by class."""

    coords: Tensor  # (N, 2)
    labels: Tensor  # (N,)
    explained_variance: list[float] = field(default_factory=list)  # fraction of variance on each axis


@dataclass
class ClusterMetrics:
    """How tightly classes cluster in the penultimate layer (the GCE paper's argument), on ``n`` examples."""

    n: int
    silhouette: float
    inter_class: float  # mean distance between class centroids
    intra_class: float  # mean distance of a point to its class centroid
    embedding: Embedding

    @property
    def separation_ratio(self) -> float:
        return self.inter_class / self.intra_class if self.intra_class > 0 else math.inf

    def to_metrics(self, prefix: str = "val") -> dict[str, float]:
        values = (self.silhouette, self.inter_class, self.intra_class, self.separation_ratio)
        return {latent_key(prefix, name): value for name, value in zip(LATENT, values, strict=True)}


@torch.no_grad()
def penultimate_features(model: nn.Module, data, *, max_examples: int | None = 1000, batch_size: int = 500,
                         seed: int = 0) -> tuple[Tensor, Tensor]:
    """(features (N, D) float32, labels (N,)) from ``model.features`` in eval mode, on the CPU."""
    feats, labels = [], []
    with eval_mode(model):
        for x, y in batches(data, batch_size, device=model_device(model), max_examples=max_examples, seed=seed):
            feats.append(model.features(x).flatten(1).float().cpu())
            labels.append(y.cpu())
    if not feats:
        raise ValueError("data: no examples")
    return torch.cat(feats), torch.cat(labels)


def silhouette_score(features: Tensor, labels: Tensor, chunk: int = 1024) -> float:
    """Mean silhouette (Rousseeuw 1987) with Euclidean distances, as scikit-learn defines it: s = (b − a) /
    max(a, b), 0 for a point alone in its class. O(N²) time, O(chunk · N) memory: subsample large splits."""
    x, labels = features.double().flatten(1), labels.long()
    classes, y = torch.unique(labels, return_inverse=True)
    if not 2 <= len(classes) <= len(x) - 1:
        raise ValueError(f"silhouette needs 2 <= number of classes <= n - 1; got {len(classes)} classes, n={len(x)}")
    onehot = torch.nn.functional.one_hot(y, len(classes)).double()
    counts = onehot.sum(0)
    scores = []
    for lo in range(0, len(x), chunk):
        dist = torch.cdist(x[lo:lo + chunk], x, compute_mode="donot_use_mm_for_euclid_dist")
        sums = dist @ onehot  # (chunk, K): total distance to each class
        own = y[lo:lo + chunk]
        own_count = counts[own]
        a = sums.gather(1, own[:, None]).squeeze(1) / (own_count - 1).clamp_min(1)
        b = (sums / counts).scatter(1, own[:, None], math.inf).amin(1)
        s = (b - a) / torch.maximum(a, b)
        scores.append(torch.where(own_count > 1, torch.nan_to_num(s), torch.zeros_like(s)))
    return torch.cat(scores).mean().item()


def class_separation(features: Tensor, labels: Tensor) -> tuple[float, float]:
    """(inter, intra): mean Euclidean distance between the class centroids over all pairs of classes, and mean
    distance of a point to its own class centroid. Their ratio is scale-free: larger means tighter clusters."""
    x = features.double().flatten(1)
    classes, y = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("class_separation needs at least 2 classes")
    centroids = torch.zeros(len(classes), x.shape[1], dtype=x.dtype).index_add_(0, y, x)
    centroids /= torch.bincount(y, minlength=len(classes)).double()[:, None]
    pairs = torch.triu_indices(len(classes), len(classes), offset=1)
    inter = (centroids[pairs[0]] - centroids[pairs[1]]).norm(dim=1).mean().item()
    return inter, (x - centroids[y]).norm(dim=1).mean().item()


def pca_embedding(features: Tensor, labels: Tensor) -> Embedding:
    """Project centred features on their top two principal axes (exact SVD; signs fixed so the largest loading
    of each axis is positive, which keeps plots of the same model comparable)."""
    x = features.double().flatten(1)
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:2]
    axes = axes * axes.gather(1, axes.abs().argmax(1, keepdim=True)).sign()
    variance = (s**2) / (s**2).sum().clamp_min(1e-300)
    coords = torch.nn.functional.pad(x @ axes.T, (0, max(0, 2 - len(axes))))
    return Embedding(coords.float(), labels.clone(), variance[:2].tolist())


def latent_clusters(model: nn.Module, data, *, max_examples: int = 1000, batch_size: int = 500,
                    seed: int = 0) -> ClusterMetrics:
    """Silhouette, centroid distances and a 2-D embedding of penultimate features on a seeded subsample."""
    feats, labels = penultimate_features(model, data, max_examples=max_examples, batch_size=batch_size, seed=seed)
    inter, intra = class_separation(feats, labels)
    return ClusterMetrics(len(labels), silhouette_score(feats, labels), inter, intra, pca_embedding(feats, labels))


@torch.no_grad()
def confusion_matrix(model: nn.Module, data, *, num_classes: int | None = None, batch_size: int = 500,
                     max_examples: int | None = None) -> Tensor:
    """(K, K) int64 counts on the CPU: row = true class, column = predicted class."""
    pairs = []
    with eval_mode(model):
        for x, y in batches(data, batch_size, device=model_device(model), max_examples=max_examples):
            logits = model(x)
            num_classes = num_classes or logits.shape[1]
            pairs.append((y * num_classes + logits.argmax(1)).cpu())
    if num_classes is None:
        raise ValueError("data: no examples")
    counts = torch.bincount(torch.cat(pairs), minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)
