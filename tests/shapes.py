"""Dataset descriptions and random batches for tests that build networks without reading data."""

from __future__ import annotations

import torch

from gan_dist.config import DatasetInfo, ModelConfig
from gan_dist.models.dcgan import DCGANOptions
from gan_dist.models.mlp import MLPOptions


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


def arch_overrides(arch: str) -> list[str]:
    """Config overrides for a small network of ``arch`` (a width-8 DCGAN; the MLP as it is)."""
    return ["model.arch=dcgan", "model.dcgan.width=8"] if arch == "dcgan" else [f"model.arch={arch}"]


def model_config(arch: str = "mlp", width: int = 8, d_depth: int = 1, **shared) -> ModelConfig:
    """A ModelConfig of ``arch``; ``width`` and ``d_depth`` apply to the DCGAN."""
    options = DCGANOptions(width=width, d_depth=d_depth) if arch == "dcgan" else MLPOptions()
    return ModelConfig(arch=arch, options=options, **shared)
