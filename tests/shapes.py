"""Dataset descriptions and random batches for tests that build networks without reading data."""

from __future__ import annotations

import torch

from gan_dist.data import DatasetInfo


def info(channels: int = 1, resolution: int = 28, classes: int = 10) -> DatasetInfo:
    """A description as the data layer would give it; the default is MNIST's shape."""
    return DatasetInfo("idx", channels, resolution, classes, tuple(str(c) for c in range(classes)),
                       {"train": 0, "test": 0}, "tests")


DIGITS = info()
RGB32 = info(3, 32, 10)


def batch(n: int, described: DatasetInfo = DIGITS, gen: torch.Generator | None = None):
    """Random images in [-1, 1] of the description's shape, and labels in its classes."""
    images = torch.rand(n, *described.shape, generator=gen) * 2 - 1
    return images, torch.randint(0, max(described.num_classes, 1), (n,), generator=gen)
