"""Seeded randomness that leaves the caller's random state as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["seeded"]


@contextmanager
def seeded(seed: int | None, device: torch.device | str) -> Iterator[None]:
    """Run the block with torch's global RNG seeded with ``seed``, then restore the RNG state of the CPU (and
    of ``device`` when it is a CUDA device) to what it was before. ``seed=None`` runs the block unseeded."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
