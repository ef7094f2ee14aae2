"""The benchmark's reference for any recipe: the recipe's own G and D, trained by a plain PyTorch loop.

What a user would write by hand for the same training: the same networks (``build_models``), the same
Adam (fused) and learning rates, the same loss on logits, ``n_critic`` D steps per G step, the same
autocast dtype and memory layout, DiffAugment's operations on every image D sees (``augment.kind=diffaug``),
the same EMA update. Nothing else: no DDP, no checkpoints, no logging, no per-step
reseeding of the noise, no metric accumulation on the device. ``benchmarks/bench.py --reference plain``
drives it as its case (a), so that (b)/(a) is what gan_dist's machinery costs.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from gan_dist.amp import Amp
from gan_dist.config import TERMS, Config, DatasetInfo
from gan_dist.data.pixels import to_unit
from gan_dist.models.base import build_models, convolutional, label_count
from gan_dist.training.augment import OPERATIONS, Draws


def plain_misfit(cfg: Config) -> str | None:
    """Why the plain loop cannot stand for this config, or None when it can."""
    terms = [name for name, options in cfg.loss.terms.items() if TERMS[name].on(options)]
    if terms:
        return f"the plain loop has no terms besides the objective (loss.{terms[0]} is on)"
    if cfg.train.compile != "off":
        return "the plain loop does not compile (train.compile)"
    if cfg.augment.kind == "ada":
        return "the plain loop has no ADA controller (augment.kind=ada)"
    if cfg.loss.kind not in ("bce", "hinge") or cfg.schedule.ramps() or cfg.train.labels != "uniform":
        return ("the plain loop writes out bce and hinge, fixed hyperparameters and uniform labels (loss.kind, "
                "schedule.*, train.labels)")
    return None


class PlainLoop:
    """One process, resident data, the recipe's step written out."""

    def __init__(self, cfg: Config, info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor,
                 device: torch.device) -> None:
        torch.manual_seed(cfg.train.seed)
        self.images, self.labels, self.device = images.to(device), labels.to(device), device
        self.classes = max(label_count(cfg.model, info), 1)
        self.z_dim, self.batch, self.n_critic = cfg.model.z_dim, cfg.train.batch_size, cfg.train.n_critic
        self.hinge = cfg.loss.kind == "hinge"
        amp = Amp(cfg.amp, device, convolutional=convolutional(cfg.model))
        self.G, self.D = (m.to(device, memory_format=amp.memory_format) for m in build_models(cfg.model, info))
        self.ema = [p.detach().clone() for p in self.G.parameters()] if cfg.ema.enabled else None
        self.decay = cfg.ema.decay
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.optim.g_lr, betas=cfg.optim.g_betas, fused=True)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.d_betas, fused=True)
        self.dtype, self.autocast, self.laid_out = amp.dtype, amp.autocast, amp.laid_out
        self.policy = [OPERATIONS[name] for name in cfg.augment.policy] if cfg.augment.kind == "diffaug" else []

    def augmented(self, images: torch.Tensor) -> torch.Tensor:
        for operation in self.policy:
            images = operation(images, Draws(None))
        return self.laid_out(images)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        picks = [torch.randint(0, len(self.labels), (self.batch,), device=self.device) for _ in range(self.n_critic)]
        return [(self.laid_out(to_unit(self.images[idx])), self.labels[idx]) for idx in picks]

    def noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(self.batch, self.z_dim, device=self.device),
                torch.randint(0, self.classes, (self.batch,), device=self.device))

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.hinge:
            return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean() if self.hinge else F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for real, labels in batches:
            z, y = self.noise()
            with torch.no_grad(), self.autocast():
                fake = self.G(z, y)
            with self.autocast():
                real_logits, fake_logits = self.D(self.augmented(real), labels), self.D(self.augmented(fake), y)
            loss = self.d_loss(real_logits.float(), fake_logits.float())
            self.opt_d.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_d.step()
        z, y = self.noise()
        self.D.requires_grad_(False)
        with self.autocast():
            logits = self.D(self.augmented(self.G(z, y)), y)
        loss = self.g_loss(logits.float())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        self.D.requires_grad_(True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.G.parameters()], 1 - self.decay)
