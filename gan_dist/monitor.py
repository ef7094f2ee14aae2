"""What a run shows: metrics on the console, in ``metrics.jsonl`` and W&B, and fixed-noise sample grids.

All ranks call in at the same steps (the metric all-reduce is a collective); only global rank 0
touches files or W&B. W&B is optional at run time: if it cannot start, training goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from gan_dist.config import LogConfig, WandbConfig
from gan_dist.data import DatasetInfo
from gan_dist.dist import DistEnv
from gan_dist.engine import NAMES, StepMetrics, derive_seed

NEVER = 2**62  # "no non-finite value yet", as a first-bad step


class Diverged(RuntimeError):
    """Training produced non-finite losses or weights: the run stops, and nothing non-finite is saved."""


def start_wandb(cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: str | None):
    """Open (or reopen, by id) the W&B run on rank 0. Returns None when disabled or when W&B fails."""
    mode = os.environ.get("WANDB_MODE", cfg.mode)
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(
            mode=mode,
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            group=cfg.group,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", init_timeout=60),
        )
    except Exception as e:  # no network, no key, bad entity, broken install: never fatal
        print(f"warning: W&B did not start ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
              "logging to the console and metrics.jsonl only", file=sys.stderr, flush=True)
        return None


def last_logged_step(path: Path) -> int:
    """The highest step already in ``metrics.jsonl`` (0 if none): steps up to it are replays."""
    last = 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue  # a line cut short by a crash
    return last


class MetricLogger:
    """Accumulates step metrics on the device and reduces them over ranks every ``log.every_steps``.

    After a resume, steps up to the last one already logged are written again to ``metrics.jsonl``
    with ``"replayed": true`` (the newest record of a step wins) and are not sent to W&B, whose
    step axis must only rise.
    """

    def __init__(self, cfg: LogConfig, env: DistEnv, run_dir: Path, wandb_run, batch_per_rank: int) -> None:
        self.cfg, self.env, self.wandb = cfg, env, wandb_run
        self.path = run_dir / "metrics.jsonl"
        self.replay_until = last_logged_step(self.path) if env.is_main else 0
        self.batch = batch_per_rank
        self.sums = torch.zeros(len(NAMES), device=env.device)
        self.bad = torch.zeros(len(NAMES), device=env.device)
        self.first_bad = torch.full((len(NAMES),), NEVER, dtype=torch.int64, device=env.device)
        self.count = 0
        self.window_start = time.perf_counter()

    def update(self, step: int, metrics: StepMetrics) -> None:
        """Accumulate on the device: non-finite values are counted (and their first step kept), not summed."""
        values = metrics.stacked()
        bad = ~torch.isfinite(values)
        self.sums += values.masked_fill(bad, 0.0)
        self.bad += bad
        self.first_bad.masked_fill_(bad & (self.first_bad == NEVER), step)
        self.count += 1

    def due(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0

    def flush(self, step: int, epoch: int, lrs: dict[str, float]) -> dict[str, float] | None:
        """Every rank calls this at the same step: one all-reduce of the means and the images/s."""
        if self.count == 0:
            return None
        elapsed = time.perf_counter() - self.window_start
        rate = torch.tensor([self.count * self.batch / elapsed], device=self.sums.device)
        total = self.env.all_reduce_sum(torch.cat([self.sums / self.count, rate, self.bad])).tolist()
        *means, images_per_s = total[:len(NAMES) + 1]  # the one host sync of the window
        if any(total[len(NAMES) + 1:]):  # the same sum on every rank, so all ranks stop here together
            first = self.env.all_reduce_min(self.first_bad.clone()).tolist()
            bad = {name: at for name, at in zip(NAMES, first, strict=True) if at != NEVER}
            raise Diverged(f"non-finite {', '.join(bad)} from step {min(bad.values())} "
                           f"(found at the log step {step})")
        record: dict[str, Any] = {"step": step, "epoch": epoch}
        record |= {k: v / self.env.world_size for k, v in zip(NAMES, means, strict=True)}
        record["images_per_s"] = images_per_s
        self.sums.zero_()
        self.count = 0
        self.window_start = time.perf_counter()
        if self.env.is_main:
            self._write(record, lrs)
        return record

    def _append(self, record: dict[str, Any]) -> bool:
        """One JSON line; returns whether the step is a replay (then W&B must not see it)."""
        replayed = record["step"] <= self.replay_until
        with self.path.open("a") as f:
            f.write(json.dumps(record | ({"replayed": True} if replayed else {})) + "\n")
        return replayed

    def log_eval(self, step: int, epoch: int, scores: dict[str, float]) -> None:
        """Evaluation scores (already equal on every rank) as ``eval/*`` keys; rank 0 writes them."""
        if not self.env.is_main:
            return
        record = {"step": step, "epoch": epoch} | {f"eval/{k}": v for k, v in scores.items()}
        replayed = self._append(record)
        print(f"eval  {step:>7} | " + " ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
        if self.wandb is not None and not replayed:
            self.wandb.log({k: v for k, v in record.items() if k.startswith("eval/")}, step=step)

    def _write(self, record: dict[str, Any], lrs: dict[str, float]) -> None:
        replayed = self._append(record)
        print(f"step {record['step']:>7} epoch {record['epoch']:>3} | d_loss {record['d_loss']:.4f} "
              f"g_loss {record['g_loss']:.4f} D(x) {record['d_real']:.3f} D(G(z)) {record['d_fake']:.3f} | "
              f"{record['images_per_s']:.0f} img/s" + (" (replayed)" if replayed else ""), flush=True)
        if self.wandb is not None and not replayed:
            extra = {f"lr/{k}": v for k, v in lrs.items()}
            if self.env.device.type == "cuda":
                extra["gpu/max_allocated_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
            train = {f"train/{k}": v for k, v in record.items() if k != "step"}
            self.wandb.log(train | extra, step=record["step"])

    def log_image(self, step: int, key: str, path: Path, caption: str) -> None:
        if self.wandb is not None and step > self.replay_until:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)


GRID_ROWS = 10  # rows of a sample grid: every class up to this many, else an even pick of them


def grid_classes(num_classes: int, rows: int = GRID_ROWS) -> list[int]:
    """The classes a grid shows, one per row: all of them up to ``rows``, else ``rows`` spread evenly
    from the first to the last (100 classes: 0, 11, 22, ..., 99). Below 2 classes none: one label
    tells no rows apart, so the rows hold distinct latents instead."""
    if num_classes < 2:
        return []
    if num_classes <= rows:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / (rows - 1)) for i in range(rows)]


def fixed_noise(z_dim: int, columns: int, seed: int, device: torch.device,
                classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and labels of a grid, row-major.

    With ``classes``, one row per class and ``columns`` latents shared by all rows, so a row differs
    from the next only by the label. Without, ``GRID_ROWS`` rows of distinct latents, every label 0.
    """
    gen = torch.Generator("cpu").manual_seed(derive_seed(seed, 0xC0FFEE))
    if classes:
        z = torch.randn(columns, z_dim, generator=gen).repeat(len(classes), 1)
        labels = torch.tensor(list(classes), dtype=torch.int64).repeat_interleave(columns)
    else:
        z = torch.randn(GRID_ROWS * columns, z_dim, generator=gen)
        labels = torch.zeros(GRID_ROWS * columns, dtype=torch.int64)
    return z.to(device), labels.to(device)


def row_names(info: DatasetInfo, classes: Sequence[int]) -> str:
    """What the rows of a grid are, for captions and messages: ``0 airplane, 11 ..., 99 truck``."""
    def name(c: int) -> str:  # "3 cat"; a name that starts with its number ("3", "3 - three") as it is
        text = info.class_names[c] if c < len(info.class_names) else ""
        return text if text.split(" ")[0] == str(c) else f"{c} {text}".strip()

    return ", ".join(name(c) for c in classes) if classes else "distinct latents per row"


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Images in [-1, 1], from G in eval mode (BatchNorm uses its running stats), restoring its mode."""
    was_training = generator.training
    generator.eval()
    try:
        return torch.cat([generator(z[i:i + batch], labels[i:i + batch]).float()
                          for i in range(0, z.shape[0], batch)])
    finally:
        generator.train(was_training)


def save_grid(images: torch.Tensor, path: Path, columns: int) -> Path:
    """A PNG grid of images in [-1, 1], gray (1 channel) or RGB (3); rows as ``fixed_noise`` lays them out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.cpu(), nrow=columns, padding=2, normalize=True, value_range=(-1, 1), pad_value=0.5)
    save_image(grid, path)
    return path


class SampleWriter:
    """The fixed-noise grid (10 columns, a row per picked class), written by rank 0 as
    ``samples/step_<N>.png`` and sent to W&B.

    ``num_classes`` is what G is conditioned on (0: unconditional); ``info`` names the classes.
    """

    COLUMNS = 10

    def __init__(self, cfg: LogConfig, env: DistEnv, run_dir: Path, z_dim: int, seed: int,
                 logger: MetricLogger, info: DatasetInfo, num_classes: int) -> None:
        self.every = cfg.samples_every_steps
        self.env, self.folder, self.logger = env, run_dir / "samples", logger
        self.classes = grid_classes(num_classes)
        self.rows = row_names(info, self.classes)
        self.z, self.labels = fixed_noise(z_dim, self.COLUMNS, seed, env.device, self.classes)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def write(self, step: int, generator: nn.Module) -> Path | None:
        if not self.env.is_main:
            return None
        path = save_grid(generate(generator, self.z, self.labels), self.folder / f"step_{step}.png", self.COLUMNS)
        what = f"one class per row ({self.rows}), the same latent down each column" if self.classes else self.rows
        self.logger.log_image(step, "samples/grid", path, f"step {step}: {what}; fixed noise")
        return path
