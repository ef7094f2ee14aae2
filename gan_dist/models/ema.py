"""The EMA of G that samples and evaluation use, with BatchNorm statistics measured for its weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gan_dist.seeds import Stream


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
