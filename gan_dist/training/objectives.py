"""The adversarial objectives on D's logits (``loss.kind``), each naming the metrics it defines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gan_dist.config import LOSSES, opt

if TYPE_CHECKING:
    pass


LossStats = dict[str, torch.Tensor]
"""Named scalars a phase or a term reports, still on the device."""


@dataclass(frozen=True)
class BCEOptions:
    label_smoothing: float = opt(0.0, "one-sided smoothing: real targets become 1 - this", ge=0, le=0.5)


class Objective:
    """The adversarial terms on D's logits, and the extra metrics they define. An objective that
    ``pairs`` compares each fake with a real image, so G's phase also runs D on a real batch and hands
    its logits to ``g``."""

    extra: tuple[str, ...] = ()
    pairs = False

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        raise NotImplementedError

    def g(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


@LOSSES.register("bce", BCEOptions)
class BCE(Objective):
    """The tutorial's loss, on logits. Reports D's mean probabilities: ``d_real`` = D(x), ``d_fake`` = D(G(z))."""

    extra = ("d_real", "d_fake")

    def __init__(self, options: BCEOptions) -> None:
        self.real_target = 1.0 - options.label_smoothing

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        loss = (F.binary_cross_entropy_with_logits(real, torch.full_like(real, self.real_target))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        with torch.no_grad():
            return loss, {"d_real": torch.sigmoid(real).mean(), "d_fake": torch.sigmoid(fake).mean()}

    def g(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


@LOSSES.register("hinge")
class Hinge(Objective):
    """The SNGAN hinge loss. Reports the mean scores, whose margins are at +1 (real) and -1 (fake)."""

    extra = ("score_real", "score_fake")

    def __init__(self, options: None) -> None:
        del options

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        return loss, {"score_real": real.detach().mean(), "score_fake": fake.detach().mean()}

    def g(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return -fake.mean()


@LOSSES.register("rpgan")
class RpGAN(Objective):
    """The relativistic pairing loss (Jolicoeur-Martineau 2019; R3GAN): D lifts each real image above the
    fake it is paired with, softplus(D(fake) - D(real)), and G the reverse. Reports the mean margin
    D(real) - D(fake) of D's step."""

    extra = ("margin",)
    pairs = True

    def __init__(self, options: None) -> None:
        del options

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        margin = real - fake
        return F.softplus(-margin).mean(), {"margin": margin.detach().mean()}

    def g(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return F.softplus(real - fake).mean()
