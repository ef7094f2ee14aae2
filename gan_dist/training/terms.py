"""The regularizers in D's phase: zero-centred gradient penalties (R1, R2), LeCam and bCR."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gan_dist.config import BCRConfig, LeCamConfig, PenaltyConfig

if TYPE_CHECKING:
    from gan_dist.amp import Amp
    from gan_dist.dist import DistEnv
    from gan_dist.training.augment import Augment


class GradientPenalty:
    """A zero-centred gradient penalty γ/2 · E‖∇ₓD(x)‖², on real images (R1, Mescheder et al. 2018) or on
    fakes (R2), lazily: on every ``every``-th D step, times ``every``, so its weight per step is γ/2
    whatever the interval (StyleGAN2). The gradient is taken with respect to the images before any
    augmentation."""

    def __init__(self, name: str, cfg: PenaltyConfig, amp: Amp) -> None:
        self.name, self.metric = name, f"{name}_penalty"
        self.gamma, self.every, self.amp = cfg.gamma, cfg.every, amp

    def due(self, d_step: int) -> bool:
        return d_step % self.every == 0

    def penalty(self, logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """E‖∇ₓD(x)‖² over the batch, differentiable with respect to D's weights."""
        grad = self.amp.input_grad(logits, real)
        return grad.float().square().flatten(1).sum(1).mean()

    def weight(self) -> float:
        return self.gamma / 2 * self.every

    def __str__(self) -> str:
        return f"{self.name.upper()} γ={self.gamma:g} every {self.every}"


class LeCam:
    """LeCam (Tseng et al. 2021): E relu(D(x) - α_fake)² + E relu(α_real - D(G(z)))², where α are EMAs
    of D's mean outputs on real and fake images. The means are all-reduced before they enter the EMAs,
    so every rank holds the same α, and the checkpoint (rank 0's) holds all of them."""

    def __init__(self, cfg: LeCamConfig, env: DistEnv) -> None:
        self.weight, self.decay, self.world_size = cfg.weight, cfg.decay, env.world_size
        self.ema = torch.zeros(2, device=env.device)  # real, fake

    def penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        ema_real, ema_fake = self.ema.unbind()
        return F.relu(real - ema_fake).square().mean() + F.relu(ema_real - fake).square().mean()

    def local_stats(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """This rank's mean outputs, to be summed over ranks."""
        return torch.stack([real.detach().mean(), fake.detach().mean()])

    def absorb(self, total: torch.Tensor) -> None:
        """The means summed over ranks enter the EMAs (after this step's penalty used them)."""
        self.ema = self.decay * self.ema + (1 - self.decay) * total / self.world_size

    def state_dict(self) -> dict:
        return {"ema": self.ema.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"].to(self.ema.device)


class BCR:
    """Balanced consistency regularization (bCR, Zhao et al. 2021): E(D(x) - D(T(x)))² on real images plus
    the same on fakes, with T every operation of ``loss.bcr.policy``. D learns outputs that T does not change,
    while it still sees the images themselves; unlike ADA it acts from the first step, whether or not D
    overfits. T draws from the step's stream after the augmentation, so ranks and resumes agree."""

    def __init__(self, cfg: BCRConfig, augment: Augment) -> None:
        self.weight, self.policy, self.augment = cfg.weight, cfg.policy, augment

    def penalty(self, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                labels: torch.Tensor, logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """E(D(x) - D(T(x)))² over a batch: ``logits`` are D's on ``images``, ``score`` runs D on T(images)."""
        transformed = self.augment.transform(images, self.policy, gen)
        return (logits - score(transformed, labels)).square().mean()
