"""Within-class diversity of G while it trains: the first sign of mode collapse, at every log step.

A collapsed conditional G draws one image per class whatever z is: each row of the sample grid is
one image repeated. This measures it in pixels: for each class of the grid, the spread of G's
images over fixed latents (the per-pixel standard deviation, averaged over pixels), divided by the
spread of the real images of that class. Near 1, G varies as much as the data does; near 0, z no
longer matters. It costs one forward pass of a few hundred latents. Every rank makes it alike (the
same latents and weights; a SyncBatchNorm in G is a collective), and rank 0 reports it.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from gan_dist.data.cache import Split
from gan_dist.data.classes import grid_classes, row_names
from gan_dist.data.pixels import to_unit
from gan_dist.seeds import Stream, latents

LATENTS = 16
"""Latents per class: the spread's standard error is then about 18% of itself, enough to tell 0.05 from 0.5."""
REAL_PER_CLASS = 512
"""Real images per class for the reference spread (all of a smaller class)."""
MIN_REAL_SPREAD = 1 / 255
"""Real images of a class that spread less than one grey level are all alike: nothing to compare G's spread with."""


def pixel_spread(images: torch.Tensor) -> float:
    """Per-pixel standard deviation over the batch, averaged over pixels and channels."""
    return images.float().std(0).mean().item()


class ZSpread:
    """G's spread over z relative to the data's, per class of the sample grid, and the classes below ``warn``."""

    def __init__(self, split: Split, num_classes: int, z_dim: int, seed: int, device: torch.device,
                 warn: float) -> None:
        self.classes = grid_classes(num_classes) or [0]
        self.names = [row_names(split.info, [c]) for c in self.classes] if num_classes > 1 else ["all"]
        self.warn, self.flagged = warn, ()
        picks = np.random.default_rng(seed)
        real = []
        for c in self.classes:
            members = np.flatnonzero(split.labels == c) if num_classes > 1 else np.arange(len(split))
            members = members if len(members) > 1 else np.arange(len(split))  # one image has no spread
            members = np.sort(picks.permutation(members)[:REAL_PER_CLASS])
            real.append(pixel_spread(to_unit(torch.from_numpy(np.asarray(split.images[members])))))
        flat = [name for name, spread in zip(self.names, real, strict=True) if spread < MIN_REAL_SPREAD]
        self.note = (f"z_spread: the real images of {', '.join(flat)} are all alike, so G's spread there has nothing "
                     "to be measured against; left out of z_spread") if flat else None
        """Said once, by the rank that warns: a ratio to no spread means nothing."""
        keep = [i for i, spread in enumerate(real) if spread >= MIN_REAL_SPREAD]
        self.classes, self.names = [self.classes[i] for i in keep], [self.names[i] for i in keep]
        self.real = [real[i] for i in keep]
        n = len(self.classes)
        self.z = latents(z_dim, n * LATENTS, seed, Stream.DIVERSITY).to(device)
        self.labels = torch.tensor(self.classes, device=device).repeat_interleave(LATENTS)

    @torch.no_grad()
    def measure(self, generator: nn.Module) -> list[float]:
        """Each class's ratio, G in training mode: BatchNorm normalises with this batch's statistics, as
        while G trains (its running statistics lag behind early on), and updates copies of its buffers,
        so the run's state is untouched."""
        state = dict(generator.named_parameters()) | {k: b.clone() for k, b in generator.named_buffers()}
        was_training = generator.training
        generator.train()
        try:
            images = functional_call(generator, state, (self.z, self.labels))
        finally:
            generator.train(was_training)
        images = images.float().reshape(len(self.classes), LATENTS, -1)
        return [pixel_spread(own) / real for own, real in zip(images, self.real, strict=True)]

    def record(self, generator: nn.Module, warn_here: bool) -> dict[str, float]:
        """The log record's fields, the mean and the worst class; a warning on stderr when ``warn_here``
        (rank 0) and the collapsed classes change."""
        if self.note and warn_here:
            print(self.note, file=sys.stderr, flush=True)
            self.note = None
        if not self.classes:
            return {}
        ratios = self.measure(generator)
        warning = self.check(ratios)
        if warning and warn_here:
            print(warning, file=sys.stderr, flush=True)
        return {"z_spread": sum(ratios) / len(ratios), "z_spread_min": min(ratios)}

    def check(self, ratios: list[float]) -> str | None:
        """A warning line when the set of classes below the threshold changes to a non-empty one."""
        flagged = tuple(i for i, r in enumerate(ratios) if r < self.warn)
        changed, self.flagged = flagged != self.flagged, flagged
        if not flagged or not changed:
            return None
        shown = ", ".join(f"{self.names[i]} ({ratios[i]:.2f})" for i in flagged)
        return (f"warning: G's samples barely change with z (mode collapse) in {len(flagged)} of "
                f"{len(ratios)} classes: {shown}; spread relative to the real images', below "
                f"log.z_spread_warn={self.warn}")
