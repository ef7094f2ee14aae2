"""The phases of a GAN iteration and the terms in them, each naming what it reports.

As in StyleGAN2-ADA's ``Loss.accumulate_gradients``, the loss runs G and D itself: a regularizer that
needs more than logits (R1 needs ∇ₓD(x)), or an augmentation of what D sees, is a term here, and the
training step stays the same. Every term returns a dict
of named scalars; logging, W&B and the GPU check take their keys from ``GANLoss.names``. Logits are
raw (no sigmoid in D) and the objectives run in float32, outside autocast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist.config import LOSSES, TERMS, ConfigError, LossConfig
from gan_dist.training.objectives import LossStats, Objective
from gan_dist.training.terms import DPhase, Term, TermContext

if TYPE_CHECKING:
    from gan_dist.amp import Amp
    from gan_dist.dist import DistEnv
    from gan_dist.training.augment import Augment




@dataclass(frozen=True)
class Network:
    """One network and where it is called: ``module`` holds its weights (the bare network); ``step`` is where it
    trains (behind DDP and torch.compile when on); ``ddp`` is that DDP wrapper (None on one process); ``no_grad``
    is where it runs without gradient (compiled when on, without DDP's hooks), as G does for D's fakes."""

    module: nn.Module
    step: nn.Module
    ddp: DDP | None
    no_grad: nn.Module

    def eager(self) -> Network:
        """The same network and weights with torch.compile's wrappers taken off."""
        def bare(m: nn.Module) -> nn.Module:
            return getattr(m, "_orig_mod", m)
        return dataclasses.replace(self, step=bare(self.step), no_grad=bare(self.no_grad))


@dataclass(frozen=True)
class Networks:
    """What the phases run: ``G`` and ``D``."""

    G: Network
    D: Network

    @contextlib.contextmanager
    def frozen_d(self) -> Iterator[None]:
        """G's phase: D takes no gradient, and its DDP's ``no_sync`` keeps it out of G's all-reduce."""
        self.D.module.requires_grad_(False)
        try:
            with self.D.ddp.no_sync() if self.D.ddp is not None else contextlib.nullcontext():
                yield
        finally:
            self.D.module.requires_grad_(True)


class GANLoss:
    """The phases of an iteration and every term in them: the configured objective (``loss.kind``), the terms of
    D's loss that are on (``TERMS``: R1, R2, LeCam, bCR, and any registered from outside), and the augmentation of
    D's inputs (``augment.kind``).

    Each phase runs its networks, adds its terms and calls backward; the engine zeroes and steps the
    optimizers around it. D runs under autocast, the terms in float32.
    """

    def __init__(self, cfg: LossConfig, augment: Augment, amp: Amp, env: DistEnv) -> None:
        self.objective: Objective = LOSSES[cfg.kind](cfg.options)
        context = TermContext(amp, env, augment)
        self.terms: list[Term] = [TERMS[name](name, options, context) for name, options in cfg.terms.items()
                                  if TERMS[name].on(options)]
        self.augment, self.amp, self.env, self.kind = augment, amp, env, cfg.kind
        self.observers = [t for t in self.terms if t.observes] + ([augment] if augment.adaptive else [])
        """What learns from D's outputs on every rank: their sums share one all-reduce per D step."""
        self.names = ("d_loss", "g_loss", *self.objective.extra, *(m for t in self.terms for m in t.metrics),
                      *augment.metrics)
        """Every metric the phases can report, in a fixed order; a step may report only some (R1 is lazy)."""
        repeated = sorted({n for n in self.names if self.names.count(n) > 1})
        if repeated:
            raise ConfigError(f"loss: the metric names {', '.join(repeated)} are reported twice (by the objective, "
                              "the terms or the augmentation); each name must have one source")

    def term(self, name: str) -> Term | None:
        """The term of section ``name``, when it is on."""
        return next((t for t in self.terms if t.name == name), None)

    @property
    def summary(self) -> str:
        """The objective and the terms that are on, for the run's start lines."""
        return " + ".join([self.kind, *map(str, self.terms)])

    def _discriminate(self, D: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """D's float32 logits on ``images``, as they come (augmented already)."""
        with self.amp.autocast():
            return D(self.amp.laid_out(images), labels).float()

    def d_phase(self, nets: Networks, real: torch.Tensor, labels: torch.Tensor, z: torch.Tensor,
                fake_labels: torch.Tensor, d_step: int, gen: torch.Generator) -> LossStats:
        """D on a real and a fake batch, its terms that are due, and backward; ``d_step`` counts D steps from 0 (it
        schedules the lazy terms), ``gen`` draws the augmentation and then the terms' randomness."""
        with torch.no_grad(), self.amp.autocast():
            fake = nets.G.no_grad(z, fake_labels)
        due = [t for t in self.terms if t.due(d_step)]
        if any(t.input_grad == "real" for t in due):
            real = real.detach().requires_grad_(True)
        if any(t.input_grad == "fake" for t in due):
            fake = fake.detach().requires_grad_(True)
        real_seen, fake_seen = self.augment(real, gen), self.augment(fake, gen)
        real_logits = self._discriminate(nets.D.step, real_seen, labels)
        fake_logits = self._discriminate(nets.D.step, fake_seen, fake_labels)
        loss, metrics = self.objective.d(real_logits, fake_logits)
        metrics["d_loss"] = loss.detach()
        phase = DPhase(real, fake, labels, fake_labels, real_seen, fake_seen, real_logits, fake_logits,
                       functools.partial(self._discriminate, nets.D.step), gen)
        for term in due:
            weighted, reported = term(phase)
            if not reported.keys() <= set(term.metrics):
                raise ValueError(f"loss.{term.name} reports {', '.join(sorted(reported.keys() - set(term.metrics)))}, "
                                 f"which it does not declare in metrics ({', '.join(term.metrics) or 'none'})")
            loss = loss + weighted
            metrics |= reported
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
                real: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossStats:
        """G's loss on its fakes through the frozen D, and backward: only G's gradient is all-reduced. An
        objective that pairs also scores ``real`` (images, labels), with no gradient to anything."""
        with nets.frozen_d():
            with self.amp.autocast():
                fake = nets.G.step(z, fake_labels)
            fake_logits = self._discriminate(nets.D.step, self.augment(fake, gen), fake_labels)
            if self.objective.pairs:
                if real is None:
                    raise ValueError(f"loss.kind={self.kind} compares fakes with reals: G's phase needs a real batch")
                with torch.no_grad():
                    real_logits = self._discriminate(nets.D.step, self.augment(real[0], gen), real[1])
                loss = self.objective.g(fake_logits, real_logits)
            else:
                loss = self.objective.g(fake_logits)
            self.amp.backward(loss)
        return {"g_loss": loss.detach()}

    def end_iteration(self, step: int) -> LossStats:
        """After the phases of step ``step``: ADA's adjustment of p (all ranks together)."""
        return self.augment.adjust(step)

    def state_dict(self) -> dict:
        """The state of the parts that keep one (ADA's p and signs, LeCam's EMAs), each under its name."""
        parts = {"augment": self.augment.state_dict()} if self.augment.adaptive else {}
        return parts | {t.name: t.state_dict() for t in self.terms if t.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint without a part's state (saved with it off) leaves the part as configured."""
        if self.augment.adaptive and "augment" in state:
            self.augment.load_state_dict(state["augment"])
        for term in self.terms:
            if term.name in state:
                term.load_state_dict(state[term.name])
