"""The base class every model derives from, and the input normalisation that lives inside it.

Attacks perturb images in [0, 1] pixel space, where ε is defined; putting the per-channel normalisation
inside the model (rather than in the data pipeline) keeps every attack, clip and projection in that space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gce.validation import check_int, is_int, is_number

__all__ = ["Classifier", "Normalize", "check_input_shape", "residual_stages"]


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Return ``input_shape`` as a ``(channels, height, width)`` tuple of positive ints, else raise."""
    if (
        not isinstance(input_shape, Sequence)
        or isinstance(input_shape, str)
        or len(input_shape) != 3
        or not all(is_int(d) for d in input_shape)
    ):
        raise ValueError(
            "input_shape must be 3 positive ints (channels, height, width), e.g. (1, 28, 28); "
            f"got {input_shape!r}"
        )
    return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))


def residual_stages(
    block: Callable[[int, int, int], nn.Module], in_planes: int, widths: Sequence[int], blocks: int
) -> nn.Sequential:
    """``blocks`` residual blocks ``block(in_planes, planes, stride)`` per stage of ``widths`` channels; the
    first block of every stage after the first halves the resolution (stride 2)."""
    layers = []
    for stage, planes in enumerate(widths):
        for i in range(blocks):
            layers.append(block(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
            in_planes = planes
    return nn.Sequential(*layers)


def _channel_stats(name: str, values: Sequence[float] | None, channels: int) -> torch.Tensor | None:
    if values is None:
        return None
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) != channels or not all(is_number(v) for v in values):
        raise ValueError(f"{name} must be {channels} finite numbers (one per input channel); got {values!r}")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the identity (and no buffers) when mean and std are None.

    mean and std are buffers, so they move with ``.to(device)`` and are saved in the state dict: a
    checkpoint carries the normalisation it was trained with.
    """

    def __init__(
        self, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or both None for no normalisation)")
        mean_t = _channel_stats("mean", mean, channels)
        std_t = _channel_stats("std", std, channels)
        if std_t is not None and not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0 for every channel; got {list(std)!r}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.mean is None:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Classifier(nn.Module):
    """An image classifier over [0, 1] pixels: ``forward(x) == head(features(x))``.

    Subclasses take their own options as keywords, pass the common ones (``input_shape``, ``num_classes``,
    ``mean``, ``std``) on as ``**common``, build their layers after ``super().__init__``, assign ``self.head``
    (the last nn.Linear) and implement :meth:`embed`. ``features`` exposes the penultimate representation, which the
    evaluation uses for the latent-cluster metrics and embeddings the GCE paper argues about.
    """

    head: nn.Linear

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.input_shape = check_input_shape(input_shape)
        check_int("num_classes", num_classes, 2)  # complement entropy needs a complement
        self.num_classes = num_classes
        self.normalize = Normalize(self.input_shape[0], mean, std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, D)`` of an already-normalised batch; called by :meth:`features`."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, D)`` of a batch ``x`` in [0, 1] pixel space."""
        return self.embed(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of a batch ``x`` in [0, 1] pixel space."""
        return self.head(self.features(x))
