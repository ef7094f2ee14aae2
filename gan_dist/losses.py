"""The phases of a GAN iteration and the terms in them, each naming what it reports.

As in StyleGAN2-ADA's ``Loss.accumulate_gradients``, the loss runs G and D itself: a regularizer that
needs more than logits (R1 needs ∇ₓD(x)), or an augmentation of what D sees, is a term here, and the
training step stays the same. Every term returns a dict
of named scalars; logging, W&B and the GPU check take their keys from ``GANLoss.names``. Logits are
raw (no sigmoid in D) and the objectives run in float32, outside autocast.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist.config import LOSSES, BCRConfig, LeCamConfig, LossConfig, PenaltyConfig, opt

if TYPE_CHECKING:
    from gan_dist.amp import Amp
    from gan_dist.augment import Augment
    from gan_dist.dist import DistEnv

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BCEOptions:
    label_smoothing: float = opt(0.0, "one-sided smoothing: real targets become 1 - this", ge=0, le=0.5)


class Objective:
    """The adversarial terms on D's logits, and the extra metrics they define. An objective that
    ``pairs`` compares each fake with a real image, so G's phase also runs D on a real batch and hands
    its logits to ``g``."""

    extra: tuple[str, ...] = ()
    pairs = False

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError

    def g(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
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

    def g(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
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

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        margin = real - fake
        return F.softplus(-margin).mean(), {"margin": margin.detach().mean()}

    def g(self, fake: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        return F.softplus(real - fake).mean()


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


@dataclass(frozen=True)
class Networks:
    """What the phases run: ``G`` and ``D`` train (behind DDP and compile when on); ``fake_G`` is the bare G
    that makes D's fakes under no_grad; ``discriminator`` is the bare D, frozen in G's phase, and
    ``d_ddp`` its DDP wrapper (None on one process), whose ``no_sync`` keeps D out of G's all-reduce."""

    G: nn.Module
    D: nn.Module
    fake_G: nn.Module
    discriminator: nn.Module
    d_ddp: DDP | None

    @contextlib.contextmanager
    def frozen_d(self) -> Iterator[None]:
        self.discriminator.requires_grad_(False)
        try:
            with self.d_ddp.no_sync() if self.d_ddp is not None else contextlib.nullcontext():
                yield
        finally:
            self.discriminator.requires_grad_(True)


class GANLoss:
    """The phases of an iteration and every term in them: the configured objective, R1 (``loss.r1.gamma`` >
    0), LeCam (``loss.lecam.weight`` > 0), bCR (``loss.bcr.weight`` > 0), and the augmentation of D's inputs
    (``augment.kind``).

    Each phase runs its networks, adds its terms and calls backward; the engine zeroes and steps the
    optimizers around it. D runs under autocast, the terms in float32.
    """

    def __init__(self, cfg: LossConfig, augment: Augment, amp: Amp, env: DistEnv) -> None:
        self.objective: Objective = LOSSES[cfg.kind](cfg.options)
        self.r1 = GradientPenalty("r1", cfg.r1, amp) if cfg.r1.gamma > 0 else None
        self.r2 = GradientPenalty("r2", cfg.r2, amp) if cfg.r2.gamma > 0 else None
        self.penalties = [t for t in (self.r1, self.r2) if t is not None]
        self.lecam = LeCam(cfg.lecam, env) if cfg.lecam.weight > 0 else None
        self.bcr = BCR(cfg.bcr, augment) if cfg.bcr.weight > 0 else None
        self.augment, self.amp, self.env = augment, amp, env
        self.observers = [t for t in (self.lecam, augment if augment.adaptive else None) if t is not None]
        """The terms that learn from D's outputs on every rank: their sums share one all-reduce per D step."""
        self.names = ("d_loss", "g_loss", *self.objective.extra, *(t.metric for t in self.penalties),
                      *(("lecam_penalty",) if self.lecam else ()), *(("bcr_penalty",) if self.bcr else ()),
                      *(("augment_p", "ada_rt") if augment.adaptive else ()))
        """Every metric the phases can report, in a fixed order; a step may report only some (R1 is lazy)."""
        self.kind = cfg.kind

    @property
    def summary(self) -> str:
        """The objective and the regularizers that are on, for the run's start lines."""
        return " + ".join([self.kind, *map(str, self.penalties),
                           *([f"LeCam λ={self.lecam.weight}"] if self.lecam else []),
                           *([f"bCR λ={self.bcr.weight} ({', '.join(self.bcr.policy)})"] if self.bcr else [])])

    def _discriminate(self, D: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """D's float32 logits on ``images``, as they come (augmented already)."""
        with self.amp.autocast():
            return D(self.amp.laid_out(images), labels).float()

    def d_phase(self, nets: Networks, real: torch.Tensor, labels: torch.Tensor, z: torch.Tensor,
                fake_labels: torch.Tensor, d_step: int, gen: torch.Generator) -> Metrics:
        """D on a real and a fake batch, and backward; ``d_step`` counts D steps from 0 (it schedules the lazy
        penalties), ``gen`` draws the augmentation."""
        with torch.no_grad(), self.amp.autocast():
            fake = nets.fake_G(z, fake_labels)
        due = [t for t in self.penalties if t.due(d_step)]
        if self.r1 in due:
            real = real.detach().requires_grad_(True)
        if self.r2 in due:
            fake = fake.detach().requires_grad_(True)
        real_seen, fake_seen = self.augment(real, gen), self.augment(fake, gen)
        real_logits = self._discriminate(nets.D, real_seen, labels)
        fake_logits = self._discriminate(nets.D, fake_seen, fake_labels)
        loss, metrics = self.objective.d(real_logits, fake_logits)
        metrics["d_loss"] = loss.detach()
        if self.lecam is not None:
            penalty = self.lecam.penalty(real_logits, fake_logits)
            loss = loss + self.lecam.weight * penalty
            metrics["lecam_penalty"] = penalty.detach()
        if self.bcr is not None:
            score = functools.partial(self._discriminate, nets.D)
            penalty = (self.bcr.penalty(score, real_seen, labels, real_logits, gen)
                       + self.bcr.penalty(score, fake_seen, fake_labels, fake_logits, gen))
            loss = loss + self.bcr.weight * penalty
            metrics["bcr_penalty"] = penalty.detach()
        for term in due:
            logits, images = (real_logits, real) if term is self.r1 else (fake_logits, fake)
            penalty = term.penalty(logits, images)
            loss = loss + term.weight() * penalty
            metrics[term.metric] = penalty.detach()
        self._observe(real_logits, fake_logits)
        self.amp.backward(loss)
        return metrics

    def _observe(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        """Each observer's statistics of this D step, summed over ranks in one all-reduce."""
        if not self.observers:
            return
        local = [t.local_stats(real_logits, fake_logits) for t in self.observers]
        total = self.env.all_reduce_sum(torch.cat(local))
        for term, part in zip(self.observers, total.split([len(x) for x in local]), strict=True):
            term.absorb(part)

    def g_phase(self, nets: Networks, z: torch.Tensor, fake_labels: torch.Tensor, gen: torch.Generator,
                real: tuple[torch.Tensor, torch.Tensor] | None = None) -> Metrics:
        """G's loss on its fakes through the frozen D, and backward: only G's gradient is all-reduced. An
        objective that pairs also scores ``real`` (images, labels), with no gradient to anything."""
        with nets.frozen_d():
            with self.amp.autocast():
                fake = nets.G(z, fake_labels)
            fake_logits = self._discriminate(nets.D, self.augment(fake, gen), fake_labels)
            real_logits = None
            if self.objective.pairs:
                if real is None:
                    raise ValueError(f"loss.kind={self.kind} compares fakes with reals: G's phase needs a real batch")
                with torch.no_grad():
                    real_logits = self._discriminate(nets.D, self.augment(real[0], gen), real[1])
            loss = self.objective.g(fake_logits, real_logits)
            self.amp.backward(loss)
        return {"g_loss": loss.detach()}

    def end_iteration(self, step: int) -> Metrics:
        """After the phases of step ``step``: ADA's adjustment of p (all ranks together)."""
        return self.augment.adjust(step)

    def state_dict(self) -> dict:
        """The state of the terms that keep one: ADA's p and signs, LeCam's EMAs."""
        return ({"augment": self.augment.state_dict()} if self.augment.adaptive else {}) | (
            {"lecam": self.lecam.state_dict()} if self.lecam else {})

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint without a term's state (saved with it off) leaves the term as configured."""
        if self.augment.adaptive and "augment" in state:
            self.augment.load_state_dict(state["augment"])
        if self.lecam is not None and "lecam" in state:
            self.lecam.load_state_dict(state["lecam"])
