"""``mlp``: the tutorial's pair, on C·H·W pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gan_dist.config import ARCHITECTURES, DatasetInfo, ModelConfig, opt
from gan_dist.models.base import Architecture, label_count, leaky, with_label


@dataclass(frozen=True)
class MLPOptions:
    g_hidden: tuple[int, ...] = opt((256, 512, 1024), "hidden widths of G", ge=1)
    d_hidden: tuple[int, ...] = opt((1024, 512, 256), "hidden widths of D", ge=1)
    d_dropout: float = opt(0.3, "dropout after each hidden layer of D", ge=0.0, le=0.95)


class MLPGenerator(nn.Module):
    """z ⊕ label embedding → 256-512-1024 → C·H·W, Tanh."""

    def __init__(self, cfg: ModelConfig, info: DatasetInfo) -> None:
        super().__init__()
        classes = label_count(cfg, info)
        self.shape = info.shape
        self.embed = nn.Embedding(classes, cfg.embed_dim) if classes else None
        layers: list[nn.Module] = []
        width = cfg.z_dim + (cfg.embed_dim if classes else 0)
        for hidden in cfg.options.g_hidden:
            layers += [nn.Linear(width, hidden), leaky()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, math.prod(self.shape)), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(with_label(z, labels, self.embed)).view(-1, *self.shape)


def _mlp_trunk(cfg: ModelConfig, info: DatasetInfo, label_in: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    width = math.prod(info.shape) + label_in
    for hidden in cfg.options.d_hidden:
        layers += [nn.Linear(width, hidden), leaky(), nn.Dropout(cfg.options.d_dropout)]
        width = hidden
    return nn.Sequential(*layers), width


ARCHITECTURES.register("mlp", MLPOptions)(Architecture(MLPGenerator, _mlp_trunk, flat=True))
