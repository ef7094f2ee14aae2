"""GAN objectives, each running its own D and G terms and naming what it reports.

As in StyleGAN2-ADA's ``Loss.accumulate_gradients``, the loss calls D itself: a regularizer that needs
more than logits (R1 needs ∇ₓD(x)) lives here, not in the training step. Every term returns a dict
of named scalars; logging, W&B and the GPU check take their keys from ``GANLoss.names``. Logits are
raw (no sigmoid in D) and the objectives run in float32, outside autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.amp import Amp
from gan_dist.config import LOSSES, LossConfig, R1Config, opt

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BCEOptions:
    label_smoothing: float = opt(0.0, "one-sided smoothing: real targets become 1 - this", ge=0, le=0.5)


class Objective:
    """The adversarial terms on D's logits, and the extra metrics they define."""

    extra: tuple[str, ...] = ()

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError

    def g(self, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@LOSSES.register("bce", BCEOptions)
class BCE(Objective):
    """The tutorial's loss, on logits. Reports D's mean probabilities: ``d_real`` = D(x), ``d_fake`` = D(G(z))."""

    extra = ("d_real", "d_fake")

    def __init__(self, options: BCEOptions) -> None:
        self.real_target = 1.0 - options.label_smoothing

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        loss = (F.binary_cross_entropy_with_logits(real, torch.full_like(real, self.real_target))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        with torch.no_grad():
            return loss, {"d_real": torch.sigmoid(real).mean(), "d_fake": torch.sigmoid(fake).mean()}

    def g(self, fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


@LOSSES.register("hinge")
class Hinge(Objective):
    """The SNGAN hinge loss. Reports the mean scores, whose margins are at +1 (real) and -1 (fake)."""

    extra = ("score_real", "score_fake")

    def __init__(self, options: None) -> None:
        del options

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        return loss, {"score_real": real.detach().mean(), "score_fake": fake.detach().mean()}

    def g(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean()


class R1:
    """R1 (Mescheder et al. 2018): γ/2 · E‖∇ₓD(x)‖² on real images, lazily: on every ``every``-th D
    step, times ``every``, so its weight per step is γ/2 whatever the interval (StyleGAN2)."""

    def __init__(self, cfg: R1Config, amp: Amp) -> None:
        self.gamma, self.every, self.amp = cfg.gamma, cfg.every, amp

    def due(self, d_step: int) -> bool:
        return d_step % self.every == 0

    def penalty(self, logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """E‖∇ₓD(x)‖² over the batch, differentiable with respect to D's weights."""
        grad = self.amp.input_grad(logits, real)
        return grad.float().square().flatten(1).sum(1).mean()

    def weight(self) -> float:
        return self.gamma / 2 * self.every


class GANLoss:
    """The configured objective plus R1 when ``loss.r1.gamma`` > 0. D runs under autocast, the terms in float32."""

    def __init__(self, cfg: LossConfig, amp: Amp) -> None:
        self.objective: Objective = LOSSES[cfg.kind](cfg.options)
        self.r1 = R1(cfg.r1, amp) if cfg.r1.gamma > 0 else None
        self.amp = amp
        self.names = ("d_loss", "g_loss", *self.objective.extra, *(("r1_penalty",) if self.r1 else ()))
        """Every metric the terms can report, in a fixed order; a step may report only some (R1 is lazy)."""

    def d_terms(self, D: nn.Module, real: torch.Tensor, labels: torch.Tensor, fake: torch.Tensor,
                fake_labels: torch.Tensor, d_step: int) -> tuple[torch.Tensor, Metrics]:
        """D's loss on a real and a fake batch; ``d_step`` counts D steps from 0 (it schedules R1)."""
        penalize = self.r1 is not None and self.r1.due(d_step)
        if penalize:
            real = real.detach().requires_grad_(True)
        with self.amp.autocast():
            real_logits, fake_logits = D(real, labels), D(fake, fake_labels)
        loss, metrics = self.objective.d(real_logits.float(), fake_logits.float())
        metrics["d_loss"] = loss.detach()
        if penalize:
            penalty = self.r1.penalty(real_logits, real)
            loss = loss + self.r1.weight() * penalty
            metrics["r1_penalty"] = penalty.detach()
        return loss, metrics

    def g_terms(self, D: nn.Module, fake: torch.Tensor, fake_labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """G's loss on its fakes (D frozen by the caller)."""
        with self.amp.autocast():
            logits = D(fake, fake_labels)
        loss = self.objective.g(logits.float())
        return loss, {"g_loss": loss.detach()}
