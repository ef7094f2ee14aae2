"""R3GAN's networks (Huang et al., NeurIPS 2024): residual, with no normalisation at all, built from the
data's description. Registered as ``model.arch=r3gan``, with its options as ``model.r3gan.*``.

Each block is x + 1×1 → grouped 3×3 → 1×1, a biased leaky ReLU after the first two; its
last layer starts at zero and the others at He's scale times L^(-1/4) for L blocks in the network
(fix-up), so a fresh network is the identity plus its transitions and its variance stays bounded at
any depth. Between stages the widths change by a 1×1 convolution, and the size by a [1, 2, 1]
low-pass filter: G upsamples after, D downsamples before. G starts from a learned s×s basis scaled per
channel by a linear map of z ⊕ the class embedding, and ends in a 1×1 convolution to the image
(no Tanh). D's trunk starts with a 1×1 convolution from the image and ends in a depthwise s×s
convolution over the basis and a linear map; ``Discriminator`` adds the head and the projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gan_dist.config import ARCHITECTURES, ConfigError, DatasetInfo, ModelConfig, opt
from gan_dist.models.base import Architecture, dcgan_stages, label_count

LEAK = 0.2
ACTIVATION_GAIN = math.sqrt(2 / (1 + LEAK**2))  # He's gain for a leaky ReLU


@dataclass(frozen=True)
class R3GANOptions:
    widths: tuple[int, ...] = opt((128,), "channels of each stage from the coarsest (4×4 at 32 px) towards the image; "
                                          "the last one also serves every finer stage", ge=8)
    blocks: int = opt(2, "residual blocks per stage, in G and in D", ge=1)
    group_size: int = opt(16, "channels per group of each block's 3×3 convolution", ge=1)
    expansion: int = opt(2, "each block widens its stream by this for the grouped 3×3", ge=1)


def stage_widths(options: R3GANOptions, levels: int) -> list[int]:
    """The width of each of ``levels`` sizes, coarsest first; refuses widths the grouping does not divide."""
    if len(options.widths) > levels:
        raise ConfigError(f"model.r3gan.widths: this resolution has {levels} stages, from the coarsest to the "
                          f"image's; {len(options.widths)} widths were given")
    widths = [options.widths[min(i, len(options.widths) - 1)] for i in range(levels)]
    for width in widths:
        if width * options.expansion % options.group_size:
            raise ConfigError(f"model.r3gan.group_size: {options.group_size} does not divide a block's "
                              f"{width} × {options.expansion} (model.r3gan.expansion) = {width * options.expansion} "
                              "channels")
    return widths


def conv(c_in: int, c_out: int, kernel: int, gain: float = 1.0, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A convolution at He's scale times ``gain`` (0: zeros); a bias starts at zero."""
    layer = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=bias)
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class Block(nn.Module):
    """x + 1×1 → leaky ReLU → grouped 3×3 → leaky ReLU → 1×1 (zero at init). The biases before each
    activation are the two first convolutions' own, which the convolution kernels add for free."""

    def __init__(self, channels: int, options: R3GANOptions, depth: int) -> None:
        super().__init__()
        wide = channels * options.expansion
        gain = ACTIVATION_GAIN * depth ** -0.25  # L^(-1/(2·3-2)): three layers per block
        self.net = nn.Sequential(conv(channels, wide, 1, gain, bias=True), nn.LeakyReLU(LEAK, inplace=True),
                                 conv(wide, wide, 3, gain, groups=wide // options.group_size, bias=True),
                                 nn.LeakyReLU(LEAK, inplace=True), conv(wide, channels, 1, 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Resample(nn.Module):
    """2× up- or down-sampling through the [1, 2, 1] low-pass filter, per channel."""

    def __init__(self, channels: int, up: bool) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(taps, taps) / taps.sum() ** 2 * (4 if up else 1)  # up: keep the mean after zeros
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).contiguous(), persistent=False)
        self.up, self.channels = up, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel.to(x.dtype)
        if self.up:
            return F.conv_transpose2d(x, k, stride=2, padding=1, output_padding=1, groups=self.channels)
        return F.conv2d(x, k, stride=2, padding=1, groups=self.channels)


def transition(c_in: int, c_out: int, up: bool) -> nn.Sequential:
    """Between two stages: the width changes by a 1×1 convolution at the smaller size (G: before upsampling,
    D: after downsampling), so the filter runs on the fewer channels' side."""
    project = [conv(c_in, c_out, 1)] if c_in != c_out else []
    return nn.Sequential(*project, Resample(c_out, up=True)) if up else nn.Sequential(Resample(c_in, up=False),
                                                                                       *project)


class R3GANGenerator(nn.Module):
    """z ⊕ class embedding → the s×s basis → stages of blocks, upsampling between them → 1×1 to the image."""

    def __init__(self, cfg: ModelConfig, info: DatasetInfo) -> None:
        super().__init__()
        options: R3GANOptions = cfg.options
        start, stages = dcgan_stages(info.resolution)
        widths = stage_widths(options, stages + 1)
        classes = label_count(cfg, info)
        self.embed = nn.Embedding(classes, cfg.embed_dim) if classes else None
        self.basis = nn.Parameter(torch.randn(widths[0], start, start))
        self.scale = nn.Linear(cfg.z_dim + (cfg.embed_dim if classes else 0), widths[0], bias=False)
        nn.init.normal_(self.scale.weight, 0.0, 1 / math.sqrt(self.scale.in_features))
        depth = options.blocks * len(widths)
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            if i:
                layers.append(transition(widths[i - 1], width, up=True))
            layers += [Block(width, options, depth) for _ in range(options.blocks)]
        self.stages = nn.Sequential(*layers)
        self.out = conv(widths[-1], info.channels, 1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        code = z if self.embed is None else torch.cat([z, self.embed(labels)], 1)
        h = self.basis.unsqueeze(0) * self.scale(code)[:, :, None, None]
        return self.out(self.stages(h))


class R3GANTrunk(nn.Module):
    """1×1 from the image → stages of blocks, downsampling between them → the depthwise s×s basis → linear."""

    def __init__(self, cfg: ModelConfig, info: DatasetInfo, label_in: int) -> None:
        super().__init__()
        options: R3GANOptions = cfg.options
        start, stages = dcgan_stages(info.resolution)
        widths = stage_widths(options, stages + 1)[::-1]  # the image's size first
        depth = options.blocks * len(widths)
        layers: list[nn.Module] = [conv(info.channels + label_in, widths[0], 1)]
        for i, width in enumerate(widths):
            if i:
                layers.append(transition(widths[i - 1], width, up=False))
            layers += [Block(width, options, depth) for _ in range(options.blocks)]
        self.stages = nn.Sequential(*layers)
        self.basis = conv(widths[-1], widths[-1], start, groups=widths[-1])
        self.basis.padding = (0, 0)
        self.features = widths[-1]
        self.project = nn.Linear(widths[-1], self.features, bias=False)
        nn.init.normal_(self.project.weight, 0.0, 1 / math.sqrt(widths[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.basis(self.stages(x)).flatten(1))


def init_head(d: nn.Module) -> None:
    """D's head and projection at 1/√features, so a fresh D's logits are of the features' own scale."""
    for layer in (d.head, d.proj):
        if layer is not None:
            nn.init.normal_(layer.weight, 0.0, 1 / math.sqrt(layer.weight.shape[-1]))
    nn.init.zeros_(d.head.bias)


def _trunk(cfg: ModelConfig, info: DatasetInfo, label_in: int) -> tuple[nn.Module, int]:
    trunk = R3GANTrunk(cfg, info, label_in)
    return trunk, trunk.features


ARCHITECTURES.register("r3gan", R3GANOptions)(Architecture(R3GANGenerator, _trunk, flat=False, init=init_head))
