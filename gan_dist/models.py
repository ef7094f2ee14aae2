"""Generators and discriminators built from the data's description: any channels, resolution and classes.

``mlp`` is the tutorial's pair, on C·H·W pixels. ``dcgan`` is its named successor: its number of
up- and down-sampling stages follows the resolution (4→8→16→32→64, or 7→14→28). With no classes
(``model.conditioning: none``, or a flat image folder) neither network takes a label. Every
discriminator returns raw logits: the sigmoid lives inside the loss, where autocast keeps it in float32.

An architecture is registered under its ``model.arch`` name with its options (``model.<arch>.*``):
a generator, and the feature trunk that ``Discriminator`` puts its label conditioning around.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from gan_dist.config import ARCHITECTURES, ConfigError, DatasetInfo, ModelConfig, opt
from gan_dist.layers import ConditionalBatchNorm2d, orthogonal_init, stage_widths
from gan_dist.seeds import Stream


@dataclass(frozen=True)
class MLPOptions:
    g_hidden: tuple[int, ...] = opt((256, 512, 1024), "hidden widths of G", ge=1)
    d_hidden: tuple[int, ...] = opt((1024, 512, 256), "hidden widths of D", ge=1)
    d_dropout: float = opt(0.3, "dropout after each hidden layer of D", ge=0.0, le=0.95)


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


def _leaky() -> nn.Module:
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
            layers += [nn.Linear(width, hidden), _leaky()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, math.prod(self.shape)), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(_with_label(z, labels, self.embed)).view(-1, *self.shape)


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


def _with_label(z: torch.Tensor, labels: torch.Tensor, embed: nn.Embedding | None) -> torch.Tensor:
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


def _mlp_trunk(cfg: ModelConfig, info: DatasetInfo, label_in: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    width = math.prod(info.shape) + label_in
    for hidden in cfg.options.d_hidden:
        layers += [nn.Linear(width, hidden), _leaky(), nn.Dropout(cfg.options.d_dropout)]
        width = hidden
    return nn.Sequential(*layers), width


def _conv_trunk(cfg: ModelConfig, info: DatasetInfo, label_in: int) -> tuple[nn.Module, int]:
    """resolution → ... → s, each stage ``d_depth - 1`` 3×3 convs then a strided 4×4 one.

    BatchNorm after every downsampling but the first, unless spectral norm already bounds the layers.
    """
    size, stages = dcgan_stages(info.resolution)
    layers: list[nn.Module] = []
    channels = info.channels + label_in
    for stage, width in enumerate(stage_widths(cfg.options.width, stages)[:-1]):
        for _ in range(cfg.options.d_depth - 1):
            layers += [nn.Conv2d(channels, width, 3, 1, 1), _leaky()]
            channels = width
        layers.append(nn.Conv2d(channels, width, 4, 2, 1))
        if stage:
            layers.append(nn.Identity() if cfg.spectral_norm else nn.BatchNorm2d(width))
        layers.append(_leaky())
        channels = width
    return nn.Sequential(*layers, nn.Flatten()), channels * size * size


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


ARCHITECTURES.register("mlp", MLPOptions)(Architecture(MLPGenerator, _mlp_trunk, flat=True))
ARCHITECTURES.register("dcgan", DCGANOptions)(Architecture(DCGANGenerator, _conv_trunk, flat=False))


def build_generator(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    return ARCHITECTURES[cfg.arch].generator(cfg, info)


def build_models(cfg: ModelConfig, info: DatasetInfo) -> tuple[nn.Module, nn.Module]:
    return build_generator(cfg, info), Discriminator(cfg, info)


class EMA:
    """An exponential moving average of G's parameters, with BatchNorm statistics measured for it.

    With a ramp-up the average starts as a copy of G and its half-life grows with the run (StyleGAN2), so
    it is never mostly G's random initialisation: with a fixed decay 0.999, 61% of it still is at step 500.

    The live G's running statistics follow its last few batches, not the averaged weights, so they
    do not fit the average. Before the average is used or saved, its statistics are measured afresh
    on fixed latents and balanced labels, the "standing statistics" of BigGAN. Fixed inputs make them
    the same on every rank with no collective; built from G before any SyncBatchNorm conversion, the
    copy never needs the other ranks either.
    """

    def __init__(self, generator: nn.Module, decay: float, rampup: float, z_dim: int, num_classes: int,
                 calibration_samples: int = 2048) -> None:
        self.decay, self.rampup, self.z_dim, self.calibration_samples = decay, rampup, z_dim, calibration_samples
        self.num_classes = max(num_classes, 1)  # unconditional: every label is 0
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        self._norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._stale = bool(self._norms)

    def decay_at(self, step: int) -> float:
        """The decay of the update that ends ``step`` (counted from 1): the configured one, or less during
        the ramp-up, where the half-life is at most ``rampup × step``. A function of the step alone, so a
        resumed run averages exactly as an uninterrupted one."""
        if self.rampup == 0:
            return self.decay
        return min(self.decay, 0.5 ** (1.0 / (self.rampup * step)))

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in generator.parameters()], 1.0 - self.decay_at(step))
        self._stale = bool(self._norms)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
        self._stale = bool(self._norms)

    @torch.no_grad()
    def calibrated(self, batch: int = 512) -> nn.Module:
        """The averaged G in eval mode, its BatchNorm statistics measured for the current weights."""
        if self._stale:
            device = next(self.module.parameters()).device
            latents = torch.Generator().manual_seed(int(Stream.CALIBRATION))
            for m in self._norms:
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batches
            self.module.train()
            for start in range(0, self.calibration_samples, batch):
                n = min(batch, self.calibration_samples - start)
                z = torch.randn(n, self.z_dim, generator=latents).to(device)
                self.module(z, torch.arange(start, start + n, device=device) % self.num_classes)
            self.module.eval()
            self._stale = False
        return self.module
