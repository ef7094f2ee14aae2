"""``dcgan``: the tutorial's named successor, whose up- and down-sampling stages follow the resolution
(4→8→16→32→64, or 7→14→28)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gan_dist.config import ARCHITECTURES, DatasetInfo, ModelConfig, opt
from gan_dist.models.base import Architecture, dcgan_stages, label_count, leaky
from gan_dist.models.layers import ConditionalBatchNorm2d, orthogonal_init, stage_widths


@dataclass(frozen=True)
class DCGANOptions:
    width: int = opt(64, "base channel count", ge=8)
    d_depth: int = opt(1, "conv layers of D per resolution stage; the extra ones are 3x3", ge=1, le=4)
    g_label: Literal["input", "batchnorm"] = opt(
        "input", "how G takes the label: its embedding joined to z at the input, or as the gains and biases of "
        "every BatchNorm (class-conditional BatchNorm, as SNGAN and BigGAN)")
    g_init: Literal["default", "orthogonal"] = opt(
        "default", "G's initial weights: PyTorch's defaults, or orthogonal (BigGAN), which keeps the DCGAN G from "
        "collapsing within each class on RGB data (docs/QUALITY.md)")


class DCGANGenerator(nn.Module):
    """z → s×s → ... → resolution: transposed convolutions and BatchNorm, a 3×3 conv to C.

    The label's embedding joins z at the input (``g_label: input``), or sets the gain and bias of
    every BatchNorm (``batchnorm``, class-conditional BatchNorm).
    """

    def __init__(self, cfg: ModelConfig, info: DatasetInfo) -> None:
        super().__init__()
        classes = label_count(cfg, info)
        size, stages = dcgan_stages(info.resolution)
        widths = stage_widths(cfg.options.width, stages)[::-1]  # coarsest first
        self.embed = nn.Embedding(classes, cfg.embed_dim) if classes else None
        self.at_input = cfg.options.g_label == "input"
        cond_dim = cfg.embed_dim if classes and not self.at_input else 0
        self.project = nn.Sequential(
            nn.Linear(cfg.z_dim + (cfg.embed_dim if classes and self.at_input else 0), widths[0] * size * size,
                      bias=False),
            nn.Unflatten(1, (widths[0], size, size)),
            ConditionalBatchNorm2d(widths[0], cond_dim),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), ConditionalBatchNorm2d(c_out, cond_dim),
                       nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], info.channels, 3, 1, 1), nn.Tanh())
        if cfg.options.g_init == "orthogonal":
            orthogonal_init(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        label = self.embed(labels) if self.embed is not None else None
        h = z if label is None or not self.at_input else torch.cat([z, label], 1)
        cond = None if self.at_input else label
        for layer in (*self.project, *self.net):
            h = layer(h, cond) if isinstance(layer, ConditionalBatchNorm2d) else layer(h)
        return h


def _conv_trunk(cfg: ModelConfig, info: DatasetInfo, label_in: int) -> tuple[nn.Module, int]:
    """resolution → ... → s, each stage ``d_depth - 1`` 3×3 convs then a strided 4×4 one.

    BatchNorm after every downsampling but the first, unless spectral norm already bounds the layers.
    """
    size, stages = dcgan_stages(info.resolution)
    layers: list[nn.Module] = []
    channels = info.channels + label_in
    for stage, width in enumerate(stage_widths(cfg.options.width, stages)[:-1]):
        for _ in range(cfg.options.d_depth - 1):
            layers += [nn.Conv2d(channels, width, 3, 1, 1), leaky()]
            channels = width
        layers.append(nn.Conv2d(channels, width, 4, 2, 1))
        if stage:
            layers.append(nn.Identity() if cfg.spectral_norm else nn.BatchNorm2d(width))
        layers.append(leaky())
        channels = width
    return nn.Sequential(*layers, nn.Flatten()), channels * size * size


ARCHITECTURES.register("dcgan", DCGANOptions)(Architecture(DCGANGenerator, _conv_trunk, flat=False))
