"""Hyperparameters that follow the images seen (``schedule.*``): constant, linear or cosine, from a start
to an end value over ``schedule.kimg`` or the run's length, as R3GAN anneals its learning rate, β2, γ,
EMA half-life and augmentation. Each value is a function of the step alone, so a resumed run takes
exactly the values an uninterrupted one would, with no state in the checkpoint.
"""

from __future__ import annotations

import math

from gan_dist.config import Config, ConfigError, Ramp, TrainConfig


def ema_half_life_kimg(decay: float, global_batch: int) -> float:
    """The half-life of an EMA with this decay per step, in thousands of images."""
    return math.log(0.5) / math.log(decay) * global_batch / 1000 if decay < 1 else math.inf


def ema_decay(half_life_kimg: float, global_batch: int) -> float:
    """The decay per step whose half-life is ``half_life_kimg`` thousand images (0: no averaging)."""
    return 0.5 ** (global_batch / (half_life_kimg * 1000)) if half_life_kimg > 0 else 0.0


def run_steps(cfg: TrainConfig, steps_per_epoch: int, global_batch: int) -> int:
    """The run's length in steps: the first of ``epochs``, ``max_steps`` and ``kimg`` to end it."""
    limits = [cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf,
              math.ceil(cfg.kimg * 1000 / global_batch) if cfg.kimg else math.inf]
    return int(min(limits))


def starts(cfg: Config, global_batch: int) -> dict[str, float]:
    """The value each ramp starts from when it names none: the key it schedules."""
    return {"g_lr": cfg.optim.g_lr, "d_lr": cfg.optim.d_lr, "g_beta2": cfg.optim.g_betas[1],
            "d_beta2": cfg.optim.d_betas[1], "r1_gamma": cfg.loss.r1.gamma, "r2_gamma": cfg.loss.r2.gamma,
            "ema_half_life": ema_half_life_kimg(cfg.ema.decay, global_batch), "augment_p": 1.0}


def value(ramp: Ramp, start: float, progress: float) -> float:
    """The ramp's value at ``progress`` ∈ [0, 1] of its length."""
    start = ramp.start if ramp.start is not None else start
    if ramp.shape == "constant":
        return start
    weight = progress if ramp.shape == "linear" else (1 - math.cos(math.pi * progress)) / 2
    return start + (ramp.end - start) * weight


class Ramps:
    """The ramps that are on, and their values at any step: over ``schedule.kimg`` thousand images, or over
    ``total_steps`` when it is null."""

    def __init__(self, cfg: Config, global_batch: int, total_steps: int | None) -> None:
        self.ramps = cfg.schedule.ramps()
        self.starts = starts(cfg, global_batch)
        if "ema_half_life" in self.ramps and self.ramps["ema_half_life"].start is None and cfg.ema.decay == 1:
            raise ConfigError("schedule.ema_half_life.start: ema.decay=1 has no finite half-life to start from; "
                              "give a start")
        if cfg.schedule.kimg is not None:
            self.length = cfg.schedule.kimg * 1000 / global_batch
        elif total_steps is not None:
            self.length = float(total_steps)
        elif self.ramps:
            raise ConfigError("schedule.kimg: the ramps need a length; set it, or train with a run length")
        else:
            self.length = 1.0
        self.length = max(self.length, 1.0)

    def at(self, step: int) -> dict[str, float]:
        """Every ramp's value at the start of step ``step`` (0-based)."""
        progress = min(step / self.length, 1.0)
        return {name: value(ramp, self.starts[name], progress) for name, ramp in self.ramps.items()}

    def __str__(self) -> str:
        def show(name: str, ramp: Ramp) -> str:
            ends = f"{value(ramp, self.starts[name], 0):.4g} → {value(ramp, self.starts[name], 1):.4g}"
            return f"{name} {ramp.shape} {ends}"
        return ", ".join(show(n, r) for n, r in self.ramps.items()) + f" over {self.length:.0f} steps"
