"""SNGAN/BigGAN-style residual networks, built from the data's description.

G: z (all of it, or its first chunk with ``z_chunks``) → a linear layer to s×s → one up-sampling
residual block per 2× stage → BatchNorm, ReLU, a 3×3 conv to C, Tanh. Every BatchNorm of a block is
class-conditional: its gain and bias come from a class embedding shared by all blocks (BigGAN), and
with ``z_chunks`` also from the block's own chunk of z. Unconditional data gets plain BatchNorm.

D's trunk: one down-sampling residual block per stage (the first one "optimized": its shortcut
pools before the 1×1 conv, as the input has no ReLU to go through), one more block at the coarsest
size, ReLU and a sum over positions. ``Discriminator`` adds the head and the projection of the
label, and spectral norm over all of it.

Widths double at each stage away from the image, from ``g_width`` / ``d_width`` at full resolution,
capped at 8× (the DCGAN's rule). Both networks start from orthogonal weights. Registered here as
``model.arch=resnet``, with its options as ``model.resnet.*``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gan_dist.config import ARCHITECTURES, ConfigError, DatasetInfo, ModelConfig, opt
from gan_dist.models.base import Architecture, dcgan_stages, label_count
from gan_dist.models.layers import ConditionalBatchNorm2d, SelfAttention, orthogonal_init, stage_widths


@dataclass(frozen=True)
class ResNetOptions:
    g_width: int = opt(64, "G's channels at full resolution; doubled per stage towards 4×4, capped at 8×", ge=8)
    d_width: int = opt(64, "D's channels at full resolution; doubled per stage, capped at 8×", ge=8)
    z_chunks: bool = opt(False, "BigGAN's hierarchical latent: z is split between the input and each block's "
                                "conditional BatchNorm")
    attention: int = opt(0, "self-attention in G and D at this resolution (0: none), above the coarsest and "
                            "below the image's (32 px: 8 or 16)", ge=0)


def check_attention(options: ResNetOptions, start: int, stages: int) -> None:
    """Attention sits after the block of G and of D whose output has that size: one between the
    coarsest and the full resolution, exclusive."""
    sizes = [start * 2 ** i for i in range(1, stages)]
    if options.attention and options.attention not in sizes:
        choices = f"use one of {', '.join(map(str, sizes))}, or 0" if sizes else (
            f"at {start * 2 ** stages} px no stage lies between the coarsest and the image's; set 0")
        raise ConfigError(f"model.resnet.attention: {options.attention} is not a stage of this resolution; {choices}")


class GBlock(nn.Module):
    """CBN, ReLU, 2× nearest up-sampling, 3×3 conv, CBN, ReLU, 3×3 conv; plus an up-sampled 1×1 shortcut."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = ConditionalBatchNorm2d(c_in, cond_dim), ConditionalBatchNorm2d(c_out, cond_dim)
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x, cond)), scale_factor=2.0)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), cond)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0))


class ResNetGenerator(nn.Module):
    """z (or its first chunk) → linear → s×s, one GBlock per stage (attention after one), BN-ReLU-conv-Tanh."""

    def __init__(self, cfg: ModelConfig, info: DatasetInfo, classes: int, start: int, stages: int) -> None:
        super().__init__()
        options: ResNetOptions = cfg.options
        check_attention(options, start, stages)
        widths = stage_widths(options.g_width, stages)[::-1]  # coarsest first
        self.chunk = cfg.z_dim // (stages + 1) if options.z_chunks else 0
        if options.z_chunks and self.chunk == 0:
            raise ConfigError(f"model.z_dim: {cfg.z_dim} cannot be split into {stages + 1} chunks "
                              "(model.resnet.z_chunks); raise it or turn the chunks off")
        self.embed = nn.Embedding(classes, cfg.embed_dim) if classes else None
        cond_dim = (cfg.embed_dim if classes else 0) + self.chunk
        self.split = [cfg.z_dim - self.chunk * stages] + [self.chunk] * stages  # the input takes what blocks leave
        self.start, self.width = start, widths[0]
        self.project = nn.Linear(self.split[0], widths[0] * start * start)
        self.blocks = nn.ModuleList(GBlock(c_in, c_out, cond_dim) for c_in, c_out in itertools.pairwise(widths))
        self.attention = nn.ModuleDict({
            str(i): SelfAttention(widths[i + 1]) for i in range(stages)
            if options.attention == start * 2 ** (i + 1)})
        self.out = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], info.channels, 3, 1, 1),
                                 nn.Tanh())
        orthogonal_init(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chunks = z.split(self.split, 1) if self.chunk else (z,)
        h = self.project(chunks[0]).view(-1, self.width, self.start, self.start)
        label = self.embed(labels) if self.embed is not None else None
        for i, block in enumerate(self.blocks):
            parts = [t for t in (label, chunks[i + 1] if self.chunk else None) if t is not None]
            h = block(h, torch.cat(parts, 1) if parts else None)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        return self.out(h)


class DBlock(nn.Module):
    """(ReLU,) 3×3 conv, ReLU, 3×3 conv, optional 2× average pooling; plus a 1×1 shortcut where the shape changes.

    The first block of D ("optimized", SNGAN) takes the image: no ReLU before its first conv, and its
    shortcut pools before the 1×1 conv.
    """

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool) -> None:
        super().__init__()
        self.down, self.first = down, first
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if down or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.first:
            return h + self.shortcut(F.avg_pool2d(x, 2))
        s = self.shortcut(x) if self.shortcut is not None else x
        return h + (F.avg_pool2d(s, 2) if self.down else s)


class ResNetTrunk(nn.Module):
    """D's features: DBlocks down to s×s (attention after one), one more DBlock, ReLU, a sum over positions."""

    def __init__(self, cfg: ModelConfig, info: DatasetInfo, label_in: int, start: int, stages: int) -> None:
        super().__init__()
        options: ResNetOptions = cfg.options
        check_attention(options, start, stages)
        widths = stage_widths(options.d_width, stages)
        layers: list[nn.Module] = []
        channels, size = info.channels + label_in, start * 2 ** stages
        for i, width in enumerate(widths[:-1]):
            layers.append(DBlock(channels, width, down=True, first=i == 0))
            channels, size = width, size // 2
            if options.attention == size:
                layers.append(SelfAttention(channels))
        layers.append(DBlock(channels, widths[-1], down=False, first=False))
        self.blocks = nn.Sequential(*layers)
        self.features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(x)).sum((2, 3))


def _resnet_generator(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    return ResNetGenerator(cfg, info, label_count(cfg, info), *dcgan_stages(info.resolution))


def _resnet_trunk(cfg: ModelConfig, info: DatasetInfo, label_in: int) -> tuple[nn.Module, int]:
    trunk = ResNetTrunk(cfg, info, label_in, *dcgan_stages(info.resolution))
    return trunk, trunk.features


ARCHITECTURES.register("resnet", ResNetOptions)(Architecture(_resnet_generator, _resnet_trunk, flat=False,
                                                             init=orthogonal_init))
