"""G rebuilt from a checkpoint alone, and images from latents: what sampling, evaluation and export share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from gan_dist.checkpoint import IncompatibleCheckpoint, check_finite, check_shapes, load_file, naming
from gan_dist.config import Config, ConfigError, DatasetInfo
from gan_dist.configio import ImportFailed, resolve
from gan_dist.models.base import build_generator
from gan_dist.models.layers import upgrade_state

if TYPE_CHECKING:
    pass


def generator_from_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                   use_ema: bool = True) -> tuple[nn.Module, Config, DatasetInfo]:
    """G (its EMA when saved and ``use_ema``) in eval mode, rebuilt from the config and data description
    the checkpoint carries, so no data is needed.

    Tensors are mapped to ``device``, so a checkpoint trained on GPUs samples on a laptop.
    """
    return generator_from_state(load_file(Path(path), device), Path(path), device, use_ema)


def generator_from_state(state: dict, path: Path, device: torch.device | str = "cpu",
                         use_ema: bool = True) -> tuple[nn.Module, Config, DatasetInfo]:
    """``generator_from_checkpoint`` on a checkpoint already read from ``path``."""
    run, engine = state["run"], state["engine"]
    try:
        cfg = resolve(run["config"])  # its ``imports`` first: G may be a user's architecture
    except ImportFailed as e:
        fix = "the module must be importable here: put its folder on PYTHONPATH" if e.missing else "fix the module"
        raise IncompatibleCheckpoint(f"checkpoint {path}: its config {e}; {fix}") from None
    except ConfigError as e:
        raise IncompatibleCheckpoint(f"checkpoint {path}: its config does not fit this gan_dist ({e})") from None
    info = DatasetInfo.from_dict(run["data"])
    generator = build_generator(cfg.model, info).to(device)
    name = "generator_ema" if use_ema and "generator_ema" in engine else "generator"
    weights = upgrade_state(engine[name], generator)
    with naming(path):
        check_finite(name, weights)
        check_shapes("generator", weights, generator)
    generator.load_state_dict(weights)
    return generator.eval().requires_grad_(False), cfg, info


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
