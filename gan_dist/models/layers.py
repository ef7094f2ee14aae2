"""What the convolutional networks share: their widths per stage, class-conditional BatchNorm,
self-attention, orthogonal init."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAX_WIDTH_MULTIPLE = 8  # the widest stage has 8 × the full-resolution width


def stage_widths(width: int, stages: int) -> list[int]:
    """Channels from the finest stage to the coarsest: width, 2·width, ... capped at 8·width."""
    return [width * min(2 ** i, MAX_WIDTH_MULTIPLE) for i in range(stages + 1)]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias are linear functions of a conditioning vector (a class embedding,
    and a chunk of z in BigGAN), as SNGAN and BigGAN condition G. With no conditioning (``cond_dim``
    0) it is a plain BatchNorm with its own affine.

    The gain is ``1 + W_g·c`` so a fresh layer starts as the identity affine, whatever c is. The
    normalisation is a child BatchNorm, so ``SyncBatchNorm.convert_sync_batchnorm`` swaps it alone and the
    conditioning stays.
    """

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=cond_dim == 0)
        self.to_gain = nn.Linear(cond_dim, channels, bias=False) if cond_dim else None
        self.to_bias = nn.Linear(cond_dim, channels, bias=False) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        if self.to_gain is None:
            return x
        return x * (1 + self.to_gain(cond))[:, :, None, None] + self.to_bias(cond)[:, :, None, None]


def upgrade_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with a ``ConditionalBatchNorm2d``'s statistics and affine found at its own level (the keys of a
    BatchNorm subclass) moved into its ``norm`` child, where ``model`` holds them."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, ConditionalBatchNorm2d):
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if f"{name}.{key}" in state:
                    state[f"{name}.norm.{key}"] = state.pop(f"{name}.{key}")
    return state


class SelfAttention(nn.Module):
    """Non-local self-attention (SAGAN, Zhang et al. 2019), with BigGAN's 2×2-pooled keys and values.

    The output joins the input through a gain that starts at 0: a fresh block is the identity, and the
    network learns how much attention to use.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.key = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.value = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # [B, C/8, HW]
        k = F.max_pool2d(self.key(x), 2).flatten(2)  # [B, C/8, HW/4]
        v = F.max_pool2d(self.value(x), 2).flatten(2)  # [B, C/2, HW/4]
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B, HW, HW/4]
        o = (v @ attention.transpose(1, 2)).view(b, c // 2, h, w)
        return x + self.gamma * self.out(o)


def orthogonal_init(module: nn.Module) -> None:
    """Orthogonal weights and zero biases for every conv, linear and embedding layer (BigGAN's init).

    An embedding's rows become unit vectors: a class starts far weaker than z (norm √z_dim) at G's input."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.orthogonal_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
