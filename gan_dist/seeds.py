"""Seeds and noise: every random draw of a run is a function of integers, never of what ran before.

A resumed run, a rank of a larger world and a sampling command all replay exactly the streams they
name, because each draw reseeds its generator from (seed, rank, step, phase) or (seed, stream).
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import torch


class Stream(IntEnum):
    """Every named random stream of the package: mixed into a seed, each gives draws no other stream shares."""

    NPZ = 1  # sample --npz: the latents of the arrays
    WALK = 2  # sample --walk: the ends of the latent walks
    DIVERSITY = 0x25BD  # z_spread's fixed latents
    HOLDOUT = 0x5EED  # which images of a folder are held out as its test split
    CALIBRATION = 0x57A7  # the EMA's BatchNorm statistics' latents and labels
    FLIP = 0xF11B  # which training images are flipped, per epoch
    NOISE_FLOOR = 0x401CE  # the uniform-noise images of the evaluation's floor
    JUDGE_ORDER = 0x1D6E  # the judge's batch order
    GRID = 0xC0FFEE  # the sample grids' latents
    AUGMENT_D = 0xA6D  # augmentation of D's inputs in its step, per D step
    AUGMENT_G = 0xA66  # augmentation of D's inputs in G's step, per step
    EVAL_LABELS = 0xE7A1  # the order of the evaluation's labels


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; close inputs give unrelated streams."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def latents(z_dim: int, n: int, seed: int, stream: int) -> torch.Tensor:
    """``n`` standard normal latents, drawn on the CPU so that a seed means the same images on any device."""
    gen = torch.Generator("cpu").manual_seed(derive_seed(seed, stream))
    return torch.randn(n, z_dim, generator=gen)


class NoiseStream:
    """Latents and fake labels of one rank, reseeded from (seed, rank, step, phase) at every draw.

    Labels are uniform over the classes, or drawn in proportion to ``weights`` (the training split's
    images per class). With no classes every fake label is 0, which unconditional networks ignore.
    """

    def __init__(self, seed: int, rank: int, z_dim: int, num_classes: int, device: torch.device,
                 weights: torch.Tensor | None = None) -> None:
        self.seed, self.rank, self.z_dim, self.device = seed, rank, z_dim, device
        self.num_classes = max(num_classes, 1)
        self.weights = weights.to(device, torch.float32) if weights is not None and num_classes > 1 else None
        self.gen, self.shared_gen = torch.Generator(device), torch.Generator(device)

    def draw(self, step: int, phase: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.gen.manual_seed(derive_seed(self.seed, self.rank, step, phase))
        z = torch.randn(n, self.z_dim, generator=self.gen, device=self.device)
        if self.weights is None:
            labels = torch.randint(0, self.num_classes, (n,), generator=self.gen, device=self.device)
        else:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=self.gen)
        return z, labels

    def shared(self, stream: Stream, step: int) -> torch.Generator:
        """A generator on the device for ``stream`` at ``step``, seeded alike on every rank: for draws over the
        global batch, of which each rank takes its rows."""
        return self.shared_gen.manual_seed(derive_seed(self.seed, step, stream))

    def seed_dropout(self, step: int) -> None:
        """Dropout draws from the default generator; pin it to the step too."""
        torch.manual_seed(derive_seed(self.seed, self.rank, step, -1))
