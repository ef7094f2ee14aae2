"""Generators and discriminators built from the data's description: any channels, resolution and classes.

``mlp`` is the tutorial's pair, on C·H·W pixels. ``dcgan`` is its named successor: its number of
up- and down-sampling stages follows the resolution (4→8→16→32→64, or 7→14→28). With no classes
(``model.conditioning: none``, or a flat image folder) neither network takes a label. Every
discriminator returns raw logits: the sigmoid lives inside the loss, where autocast keeps it in float32.

An architecture is registered under its ``model.arch`` name with its options (``model.<arch>.*``):
a generator, and the feature trunk that ``Discriminator`` puts its label conditioning around.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from gan_dist.config import ARCHITECTURES, ConfigError, DatasetInfo, ModelConfig


def leaky() -> nn.Module:
    return nn.LeakyReLU(0.2)


def label_count(cfg: ModelConfig, info: DatasetInfo) -> int:
    """Classes G and D are conditioned on; 0 when unconditional."""
    if cfg.conditioning == "none":
        return 0
    if not info.conditional:
        raise ConfigError(f"model.conditioning={cfg.conditioning} needs class labels, but {info.name} at "
                          f"{info.source} has none (a flat folder); set model.conditioning=none")
    return info.num_classes


def dcgan_stages(resolution: int) -> tuple[int, int]:
    """(start size, number of 2× stages) of a DCGAN for ``resolution``: halved while even and above 7."""
    size, stages = resolution, 0
    while size % 2 == 0 and size > 7:
        size, stages = size // 2, stages + 1
    if stages == 0:
        raise ConfigError(f"data.resolution: the conv architectures need an even size above 7 (they halve it while it "
                          f"is even and above 7: 28 → 7, 32 → 4, 18 → 9), got {resolution}")
    return size, stages


def convolutional(cfg: ModelConfig) -> bool:
    """Whether ``model.arch`` sees images as images (its memory layout then matters)."""
    return not ARCHITECTURES[cfg.arch].flat


def check_resolution(cfg: ModelConfig, resolution: int) -> None:
    """Refuse a size that ``model.arch`` cannot be built for, before any data is read."""
    if convolutional(cfg):
        dcgan_stages(resolution)


def with_label(z: torch.Tensor, labels: torch.Tensor, embed: nn.Embedding | None) -> torch.Tensor:
    return z if embed is None else torch.cat([z, embed(labels)], 1)


class Discriminator(nn.Module):
    """A feature trunk plus the label: concatenated at the input, as a projection on the features, or none.

    Concat (the tutorial): the label's embedding joins the image, as extra constant planes for the
    conv trunk. Projection (Miyato & Koyama 2018): logit = w·φ(x) + embed(y)·φ(x).
    """

    def __init__(self, cfg: ModelConfig, info: DatasetInfo) -> None:
        super().__init__()
        classes = label_count(cfg, info)
        arch: Architecture = ARCHITECTURES[cfg.arch]
        self.flat = arch.flat
        label_in = cfg.embed_dim if classes and cfg.conditioning == "concat" else 0
        self.trunk, features = arch.trunk(cfg, info, label_in)
        self.head = nn.Linear(features, 1)
        self.embed = nn.Embedding(classes, cfg.embed_dim) if label_in else None
        self.proj = nn.Embedding(classes, features) if classes and cfg.conditioning == "projection" else None
        if arch.init is not None:
            arch.init(self)
        if cfg.spectral_norm:
            for m in [*self.trunk.modules(), self.head, self.proj]:
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    spectral_norm(m)

    def _join_label(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.flat:
            x = x.flatten(1)
        if self.embed is None:
            return x
        e = self.embed(labels)
        return torch.cat([x, e if self.flat else e[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.trunk(self._join_label(x, labels))
        logits = self.head(h)
        if self.proj is not None:
            logits = logits + (self.proj(labels) * h).sum(1, keepdim=True)
        return logits.squeeze(1)


@dataclass(frozen=True)
class Architecture:
    """What ``model.arch`` names: G's class, and D's trunk (with the features it ends in)."""

    generator: Callable[[ModelConfig, DatasetInfo], nn.Module]
    trunk: Callable[[ModelConfig, DatasetInfo, int], tuple[nn.Module, int]]
    """(config, data, label channels joined at the input) -> (trunk, feature size)."""
    flat: bool
    """D's input is flattened to C·H·W before the label joins it."""
    init: Callable[[nn.Module], None] | None = None
    """Re-initialises the whole D, head and projection included, once built (G's class does its own)."""


def build_generator(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    return ARCHITECTURES[cfg.arch].generator(cfg, info)


def build_models(cfg: ModelConfig, info: DatasetInfo) -> tuple[nn.Module, nn.Module]:
    return build_generator(cfg, info), Discriminator(cfg, info)
