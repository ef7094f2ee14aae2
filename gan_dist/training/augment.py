"""Differentiable augmentation of every image D sees, so that D cannot memorise a small training set.

DiffAugment (Zhao et al. 2020) applies its policy to every real and fake image, in D's step and in
G's, so G's gradient flows through the same transforms D was trained behind. ADA (Karras et al.
2020) applies each operation to an image with probability p, and steers p from D's overfitting:
r_t = E[sign(D(x_real))], all-reduced over ranks every ``augment.ada_interval`` steps, is held near
``augment.ada_target``. Every draw comes from the generator the caller passes in, seeded by (seed,
step) alike on every rank; each image of the global batch takes its own row of the draws, so a
resumed run, and 2 ranks against 1, augment every image alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gan_dist.config import AugmentConfig

if TYPE_CHECKING:
    from gan_dist.dist import DistEnv


class Draws:
    """Random numbers for each image of the global batch, of which this rank holds rows [rank·n, (rank+1)·n):
    an image gets the same draws at any world size, so that 2 ranks augment as 1 rank does. ``gen`` is
    seeded alike on every rank (None: the default generator, for a hand-written loop)."""

    def __init__(self, gen: torch.Generator | None, rank: int = 0, world_size: int = 1) -> None:
        self.gen, self.rank, self.world_size = gen, rank, world_size

    def _mine(self, full: torch.Tensor, n: int) -> torch.Tensor:
        return full[self.rank * n:(self.rank + 1) * n]

    def uniform(self, x: torch.Tensor, *shape: int) -> torch.Tensor:
        """U[0, 1) of ``shape`` per image of ``x``, drawn in float32 on its device, in its dtype."""
        n = x.shape[0]
        full = torch.rand(n * self.world_size, *shape, generator=self.gen, device=x.device)
        return self._mine(full, n).to(x.dtype)

    def integers(self, x: torch.Tensor, low: int, high: int) -> torch.Tensor:
        """One integer in [low, high) per image of ``x``."""
        n = x.shape[0]
        return self._mine(torch.randint(low, high, (n * self.world_size,), generator=self.gen, device=x.device), n)


def color(x: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Brightness ± 0.5, saturation × [0, 2), contrast × [0.5, 1.5): DiffAugment's ranges on [-1, 1] images."""
    brightness, saturation, contrast = (draws.uniform(x, 1, 1, 1) for _ in range(3))
    x = x + (brightness - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (saturation * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (contrast + 0.5) + mean


def translation(x: torch.Tensor, draws: Draws, ratio: float = 0.125) -> torch.Tensor:
    """Shift by up to ``ratio`` of the size in each direction, filling with 0 (mid-grey)."""
    n, _, h, w = x.shape
    r = int(max(h, w) * ratio + 0.5)
    dy, dx = draws.integers(x, -r, r + 1), draws.integers(x, -r, r + 1)
    rows = torch.arange(h, device=x.device).view(1, h) + r - dy.view(n, 1)
    cols = torch.arange(w, device=x.device).view(1, w) + r - dx.view(n, 1)
    padded = F.pad(x, [r, r, r, r])
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, draws: Draws, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of ``ratio`` of the size, centred anywhere in the image (so it may be cut by the edge)."""
    n, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    centre_y, centre_x = draws.uniform(x), draws.uniform(x)
    top = (centre_y * h).long().view(n, 1, 1) - size_h // 2
    left = (centre_x * w).long().view(n, 1, 1) - size_w // 2
    y = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (y >= top) & (y < top + size_h) & (xs >= left) & (xs < left + size_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


OPERATIONS = {"color": color, "translation": translation, "cutout": cutout}
ADA_METRICS = ("augment_p", "ada_rt")
"""ADA's probability and the E[sign(D(real))] that steers it, as every log record names them."""


class Augment:
    """``augment.*``: the policy, and for ADA its probability p and the signs it is steered by.

    Its state (p, and the signs of all ranks gathered since the last adjustment) is saved in the checkpoint.
    """

    def __init__(self, cfg: AugmentConfig, env: DistEnv, global_batch: int) -> None:
        self.cfg, self.env = cfg, env
        self.adaptive = cfg.kind == "ada"
        self.p = cfg.ada_p if self.adaptive else 1.0
        self.rt = 0.0
        # p moves by at most ada_interval global batches' worth of images per adjustment, so from 0 to 1
        # over ada_kimg thousand images.
        self.speed = global_batch * cfg.ada_interval / (cfg.ada_kimg * 1000)
        self.signs = torch.zeros(2, device=env.device)  # sum of sign(D(real)), count
        self.metrics = ADA_METRICS if self.adaptive else ()
        """What ``adjust`` reports, for the logger's names."""

    @property
    def enabled(self) -> bool:
        return self.cfg.kind != "none"

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` with the policy applied with probability p (1 for DiffAugment)."""
        if not self.enabled or self.p == 0:
            return x
        return self.transform(x, self.cfg.policy, gen, self.p)

    def transform(self, x: torch.Tensor, policy: tuple[str, ...], gen: torch.Generator,
                  p: float = 1.0) -> torch.Tensor:
        """``x`` with each operation of ``policy`` applied to each image with probability ``p``, from this rank's
        rows of the draws: the others pass through unchanged. Every operation draws its randomness whatever p
        is, so p changes which images are augmented, never how."""
        draws = Draws(gen, self.env.rank, self.env.world_size)
        for name in policy:
            on = draws.uniform(x, 1, 1, 1) < p
            x = torch.where(on, OPERATIONS[name](x, draws), x)
        return x

    def __str__(self) -> str:
        ops = ", ".join(self.cfg.policy)
        if not self.adaptive:
            return f"{self.cfg.kind} ({ops}) on every image D sees"
        return (f"ada ({ops}) each with probability p = {self.p:.3f}, steered every {self.cfg.ada_interval} steps "
                f"toward E[sign(D(real))] = {self.cfg.ada_target}")

    def local_stats(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """This rank's sum of sign(D(real)) and its count, to be summed over ranks."""
        logits = real_logits.detach().float()
        return torch.stack([logits.sign().sum(), torch.full((), float(logits.numel()), device=logits.device)])

    def absorb(self, total: torch.Tensor) -> None:
        """Adds the signs summed over all ranks, so that every rank (and the checkpoint, which rank 0
        writes) holds the same totals. On the device: no host read until the next adjustment."""
        self.signs += total

    def adjust(self, step: int) -> dict[str, torch.Tensor]:
        """After step ``step`` (0-based): every ``ada_interval`` steps, all ranks together move p toward the
        target. Returns ``augment_p`` and ``ada_rt`` for the metrics."""
        if not self.adaptive:
            return {}
        if (step + 1) % self.cfg.ada_interval == 0:
            total, count = self.signs.tolist()
            self.signs.zero_()
            self.rt = total / max(count, 1.0)
            direction = 1.0 if self.rt > self.cfg.ada_target else -1.0 if self.rt < self.cfg.ada_target else 0.0
            self.p = min(max(self.p + direction * self.speed, 0.0), 1.0)
        device = self.signs.device  # a fill, not a copy of host data: no wait for the device's queue
        return dict(zip(ADA_METRICS, (torch.full((), v, device=device) for v in (self.p, self.rt)), strict=True))

    def state_dict(self) -> dict:
        return {"p": self.p, "rt": self.rt, "signs": self.signs.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.p, self.rt = float(state["p"]), float(state["rt"])
        self.signs = state["signs"].to(self.signs.device)
