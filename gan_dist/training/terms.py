"""The terms of D's phase, each a self-contained method: its options (the config section ``loss.<name>``), when it
is on, what it needs, the metrics it reports, and its state.

A term is registered in ``TERMS`` under its section's name, with its options' dataclass; ``GANLoss`` builds
every term that is on and runs them in the order they were registered, so a new regularizer is one class and
one registration, here or in a user's module named by ``imports:``. Built in: the zero-centred gradient
penalties R1 (on real images) and R2 (on fakes), LeCam and bCR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from gan_dist.config import TERMS, ConfigError, Operation, opt
from gan_dist.training.objectives import LossStats

if TYPE_CHECKING:
    from gan_dist.amp import Amp
    from gan_dist.dist import DistEnv
    from gan_dist.training.augment import Augment


@dataclass(frozen=True)
class TermContext:
    """What a term may use when it is built: the precision, the ranks and the augmentation."""

    amp: Amp
    env: DistEnv
    augment: Augment


@dataclass
class DPhase:
    """One D step as the terms see it: the images (``real`` and ``fake`` require grad where a due term asked), what
    D saw of them after augmentation, its float32 logits on those, ``score`` to run D on other images, and the
    step's stream ``gen`` (drawn from after the augmentation)."""

    real: torch.Tensor
    fake: torch.Tensor
    labels: torch.Tensor
    fake_labels: torch.Tensor
    real_seen: torch.Tensor
    fake_seen: torch.Tensor
    real_logits: torch.Tensor
    fake_logits: torch.Tensor
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    gen: torch.Generator


class Term:
    """A term of D's loss. Subclasses set ``metrics`` (the names ``__call__`` reports, checked once at build) and
    implement ``on``, ``__call__`` and ``__str__``; the rest has defaults."""

    metrics: ClassVar[tuple[str, ...]] = ()
    input_grad: ClassVar[Literal["real", "fake"] | None] = None
    """Whose gradient the term differentiates: those images then require grad on the steps it is due."""
    observes: ClassVar[bool] = False
    """It learns from D's outputs on every rank: ``local_stats`` are summed over ranks and ``absorb``-ed, in the one
    all-reduce that every observer of the D step shares."""

    def __init__(self, name: str, options: Any, context: TermContext) -> None:
        self.name, self.options = name, options

    @staticmethod
    def on(options: Any) -> bool:
        """Whether the section turns the term on (its weight is above 0)."""
        raise NotImplementedError

    def due(self, d_step: int) -> bool:
        return True

    def __call__(self, phase: DPhase) -> tuple[torch.Tensor, LossStats]:
        """The weighted loss to add to D's, and the metrics (``self.metrics``, detached)."""
        raise NotImplementedError

    def local_stats(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def absorb(self, total: torch.Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint without the term's state (saved with it off) leaves it as configured."""


@dataclass(frozen=True)
class PenaltyOptions:
    gamma: float = opt(0.0, "weight γ of the penalty γ/2·E‖∇ₓD(x)‖² (0: off)", ge=0)
    every: int = opt(16, "lazy regularization: the penalty, times this, on every this many D steps", ge=1)


class GradientPenalty(Term):
    """A zero-centred gradient penalty γ/2 · E‖∇ₓD(x)‖², on real images (R1, Mescheder et al. 2018) or on
    fakes (R2), lazily: on every ``every``-th D step, times ``every``, so its weight per step is γ/2
    whatever the interval (StyleGAN2). The gradient is taken with respect to the images before any
    augmentation. ``gamma`` may follow a ramp (``schedule.r1_gamma``)."""

    def __init__(self, name: str, options: PenaltyOptions, context: TermContext) -> None:
        super().__init__(name, options, context)
        self.gamma, self.every, self.amp = options.gamma, options.every, context.amp

    @staticmethod
    def on(options: PenaltyOptions) -> bool:
        return options.gamma > 0

    def due(self, d_step: int) -> bool:
        return d_step % self.every == 0

    def penalty(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """E‖∇ₓD(x)‖² over the batch, differentiable with respect to D's weights."""
        grad = self.amp.input_grad(logits, images)
        return grad.float().square().flatten(1).sum(1).mean()

    def __call__(self, phase: DPhase) -> tuple[torch.Tensor, LossStats]:
        logits, images = (phase.real_logits, phase.real) if self.input_grad == "real" else (phase.fake_logits,
                                                                                            phase.fake)
        penalty = self.penalty(logits, images)
        return self.gamma / 2 * self.every * penalty, {self.metrics[0]: penalty.detach()}

    def __str__(self) -> str:
        return f"{self.name.upper()} γ={self.gamma:g} every {self.every}"


@TERMS.register("r1", PenaltyOptions)
class R1(GradientPenalty):
    """R1: the penalty on real images."""

    metrics = ("r1_penalty",)
    input_grad = "real"


@TERMS.register("r2", PenaltyOptions)
class R2(GradientPenalty):
    """R2: the penalty on generated images (R3GAN pairs it with R1 and rpgan)."""

    metrics = ("r2_penalty",)
    input_grad = "fake"


@dataclass(frozen=True)
class LeCamOptions:
    weight: float = opt(0.0, "weight λ of LeCam's ‖D(x) - EMA D(G(z))‖² + ‖D(G(z)) - EMA D(x)‖², hinged "
                             "(Tseng et al. 2021; 0: off)", ge=0)
    decay: float = opt(0.99, "decay per D step of the EMAs of D's mean outputs on real and fake images", ge=0, lt=1)


@TERMS.register("lecam", LeCamOptions)
class LeCam(Term):
    """LeCam (Tseng et al. 2021): D's outputs held near EMAs of its outputs on the other kind of image.

    E relu(D(x) - α_fake)² + E relu(α_real - D(G(z)))², where α are EMAs of D's mean outputs on real and fake
    images. The means are all-reduced before they enter the EMAs, so every rank holds the same α, and the
    checkpoint (rank 0's) holds all of them."""

    metrics = ("lecam_penalty",)
    observes = True

    def __init__(self, name: str, options: LeCamOptions, context: TermContext) -> None:
        super().__init__(name, options, context)
        self.weight, self.decay, self.world_size = options.weight, options.decay, context.env.world_size
        self.ema = torch.zeros(2, device=context.env.device)  # real, fake

    @staticmethod
    def on(options: LeCamOptions) -> bool:
        return options.weight > 0

    def __call__(self, phase: DPhase) -> tuple[torch.Tensor, LossStats]:
        ema_real, ema_fake = self.ema.unbind()
        penalty = (F.relu(phase.real_logits - ema_fake).square().mean()
                   + F.relu(ema_real - phase.fake_logits).square().mean())
        return self.weight * penalty, {"lecam_penalty": penalty.detach()}

    def local_stats(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """This rank's mean outputs, to be summed over ranks."""
        return torch.stack([real_logits.detach().mean(), fake_logits.detach().mean()])

    def absorb(self, total: torch.Tensor) -> None:
        """The means summed over ranks enter the EMAs (after this step's penalty used them)."""
        self.ema = self.decay * self.ema + (1 - self.decay) * total / self.world_size

    def state_dict(self) -> dict:
        return {"ema": self.ema.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"].to(self.ema.device)

    def __str__(self) -> str:
        return f"LeCam λ={self.weight}"


@dataclass(frozen=True)
class BCROptions:
    weight: float = opt(0.0, "weight λ of bCR's E(D(x) - D(T(x)))² on real and on fake images, T drawn from "
                             "loss.bcr.policy (Zhao et al. 2021; 0: off)", ge=0)
    policy: tuple[Operation, ...] = opt(
        ("translation",), "the operations T applies to every image, in order (as augment.policy)")

    def __post_init__(self) -> None:
        if self.weight > 0 and not self.policy:
            raise ConfigError("loss.bcr.policy: loss.bcr.weight > 0 needs at least one operation")


@TERMS.register("bcr", BCROptions)
class BCR(Term):
    """bCR (Zhao et al. 2021): D's outputs unchanged by augmentation.

    E(D(x) - D(T(x)))² on real images plus the same on fakes, with T every operation of ``loss.bcr.policy``
    (balanced consistency regularization). D learns outputs that T does not change,
    while it still sees the images themselves; unlike ADA it acts from the first step, whether or not D
    overfits. T draws from the step's stream after the augmentation, so ranks and resumes agree."""

    metrics = ("bcr_penalty",)

    def __init__(self, name: str, options: BCROptions, context: TermContext) -> None:
        super().__init__(name, options, context)
        self.weight, self.policy, self.augment = options.weight, options.policy, context.augment

    @staticmethod
    def on(options: BCROptions) -> bool:
        return options.weight > 0

    def consistency(self, phase: DPhase, images: torch.Tensor, labels: torch.Tensor,
                    logits: torch.Tensor) -> torch.Tensor:
        """E(D(x) - D(T(x)))² over a batch whose logits D gave as ``logits``."""
        transformed = self.augment.transform(images, self.policy, phase.gen)
        return (logits - phase.score(transformed, labels)).square().mean()

    def __call__(self, phase: DPhase) -> tuple[torch.Tensor, LossStats]:
        penalty = (self.consistency(phase, phase.real_seen, phase.labels, phase.real_logits)
                   + self.consistency(phase, phase.fake_seen, phase.fake_labels, phase.fake_logits))
        return self.weight * penalty, {"bcr_penalty": penalty.detach()}

    def __str__(self) -> str:
        return f"bCR λ={self.weight} ({', '.join(self.policy)})"
