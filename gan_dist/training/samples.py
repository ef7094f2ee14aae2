"""The run's sample grids: fixed noise, one class per row, written every ``log.samples_every_steps``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from gan_dist.config import DatasetInfo, LogConfig, WriteError
from gan_dist.data.classes import GRID_ROWS, grid_classes, row_names
from gan_dist.models.loading import generate
from gan_dist.seeds import Stream, derive_seed
from gan_dist.training.position import Component, Context, Position

if TYPE_CHECKING:
    from gan_dist.dist import Agreed, DistEnv


def fixed_noise(z_dim: int, columns: int, seed: int, device: torch.device,
                classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and labels of a grid, row-major.

    With ``classes``, one row per class and ``columns`` latents shared by all rows, so a row differs
    from the next only by the label. Without, ``GRID_ROWS`` rows of distinct latents, every label 0.
    """
    gen = torch.Generator("cpu").manual_seed(derive_seed(seed, Stream.GRID))
    if classes:
        z = torch.randn(columns, z_dim, generator=gen).repeat(len(classes), 1)
        labels = torch.tensor(list(classes), dtype=torch.int64).repeat_interleave(columns)
    else:
        z = torch.randn(GRID_ROWS * columns, z_dim, generator=gen)
        labels = torch.zeros(GRID_ROWS * columns, dtype=torch.int64)
    return z.to(device), labels.to(device)


def save_grid(images: torch.Tensor, path: Path, columns: int) -> Path:
    """A PNG grid of images in [-1, 1], gray (1 channel) or RGB (3); rows as ``fixed_noise`` lays them out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.cpu(), nrow=columns, padding=2, normalize=True, value_range=(-1, 1), pad_value=0.5)
    save_image(grid, path)
    return path


class SampleWriter(Component):
    """The fixed-noise grid (10 columns, a row per picked class) of ``sampler()``, written by rank 0 as
    ``samples/step_<N>.png`` and sent on by ``log_image(step, key, path, caption)`` (W&B).

    ``num_classes`` is what G is conditioned on (0: unconditional); ``info`` names the classes.
    """

    COLUMNS = 10
    final = True

    def __init__(self, every: int, env: DistEnv, run_dir: Path, info: DatasetInfo, num_classes: int, z_dim: int,
                 seed: int, sampler: Callable[[], nn.Module], log_image: Callable[[int, str, Path, str], None]) -> None:
        self.every = every
        self.env, self.folder = env, run_dir / "samples"
        self.sampler, self.log_image = sampler, log_image
        self.classes = grid_classes(num_classes)
        self.rows = row_names(info, self.classes)
        self.z, self.labels = fixed_noise(z_dim, self.COLUMNS, seed, env.device, self.classes)

    @classmethod
    def build(cls, cfg: LogConfig, ctx: Context) -> SampleWriter:
        engine = ctx.engine
        return cls(cfg.samples_every_steps, ctx.env, ctx.run_dir, ctx.split.info, engine.label_classes, ctx.z_dim,
                   ctx.seed, lambda: engine.sampler, ctx.sink.log_image)

    def due(self, pos: Position, agreed: Agreed) -> bool:
        """Every ``log.samples_every_steps`` steps; when that is 0, at the end of each epoch."""
        return pos.step % self.every == 0 if self.every > 0 else pos.epoch_ended

    def run(self, pos: Position) -> None:
        self.write(pos.step, self.sampler())

    def write(self, step: int, generator: nn.Module) -> Path | None:
        """Every rank calls this at the same step; rank 0 writes, and if it cannot, every rank raises."""
        path = self.folder / f"step_{step}.png"
        what = f"one class per row ({self.rows}), the same latent down each column" if self.classes else self.rows
        with self.env.together(WriteError):
            if self.env.is_main:
                try:
                    save_grid(generate(generator, self.z, self.labels), path, self.COLUMNS)
                    self.log_image(step, "samples/grid", path, f"step {step}: {what}; fixed noise")  # W&B copies it
                except OSError as e:
                    raise WriteError(e.filename or path, e) from None
        return path if self.env.is_main else None
