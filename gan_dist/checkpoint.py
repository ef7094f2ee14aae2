"""Atomic rank-0 checkpoints, rolling retention, and resume with fallback past broken files.

A checkpoint is a plain dict of tensors and builtins, so ``torch.load(weights_only=True)`` reads
it without running pickled code. It is written to a temporary file in the same folder, fsynced,
renamed over ``step_<N>.pt`` and the folder fsynced: a crash at any instant leaves either the old
set or the new file, never a half-file under a valid name.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gan_dist.config import CheckpointConfig, Config, ConfigError, from_dict
from gan_dist.dist import DistEnv
from gan_dist.models import build_generator

FORMAT_VERSION = 1
REQUIRED = ("format_version", "generator", "discriminator", "opt_g", "opt_d", "scaler", "step", "epoch", "batch",
            "world_size", "config")
_NAME = re.compile(r"step_(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or does not fit this run; entry points exit with status 2."""


class IncompatibleCheckpoint(CheckpointError):
    """Readable but not for this run (format or model shape): never silently skipped."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that readers see the old file, or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(f"saving checkpoint {path} failed (disk full?): {reason}") from e


def load_file(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read and sanity-check one checkpoint; raise ``CheckpointError`` if it is not usable at all."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle opcode, non-allowlisted global, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {path} is not a gan_dist checkpoint (missing {', '.join(missing)})")
    if state["format_version"] != FORMAT_VERSION:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} has format version {state['format_version']}; this gan_dist reads {FORMAT_VERSION}"
        )
    return state


def check_shapes(path: Path, name: str, saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Compare a saved state dict with the model this config builds; say what differs."""
    own = model.state_dict()
    if saved.keys() != own.keys():
        extra, missing = sorted(saved.keys() - own.keys()), sorted(own.keys() - saved.keys())
        raise IncompatibleCheckpoint(
            f"checkpoint {path}: {name} has other layers than this config builds "
            f"(only in checkpoint: {extra[:3]}, only in config: {missing[:3]}); check model.*"
        )
    for key, tensor in own.items():
        if saved[key].shape != tensor.shape:
            raise IncompatibleCheckpoint(
                f"checkpoint {path}: {name}.{key} has shape {tuple(saved[key].shape)}, "
                f"this config builds {tuple(tensor.shape)}; check model.*"
            )


class Checkpointer:
    """Decides when to save, writes on rank 0 only, and finds what to resume from."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.folder = run_dir / "checkpoints"
        self.last_save = time.monotonic()
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".step_*.pt.tmp*"):  # left by a crash mid-write
                stale.unlink(missing_ok=True)

    def existing(self) -> list[Path]:
        """Rolling checkpoints, newest first."""
        found = [(int(m.group(1)), p) for p in self.folder.glob("step_*.pt") if (m := _NAME.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def due(self, step: int) -> bool:
        by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        by_time = self.cfg.every_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes
        return by_steps or by_time

    def save(self, state: dict[str, Any], name: str | None = None) -> Path:
        """Every rank calls this. Rank 0 writes; all ranks then agree that it worked, or all raise.

        By default the file is the rolling ``step_<N>.pt``; ``name`` writes another (``best.pt``).
        """
        path = self.folder / (name or f"step_{state['step']}.pt")
        error: CheckpointError | None = None
        if self.env.is_main:
            try:
                atomic_save(state, path)
                if name is None:
                    self._prune()
            except CheckpointError as e:
                error = e
        # The agreement is the barrier: no rank runs ahead into steps that a failed save would lose.
        if self.env.any(error is not None):
            raise error or CheckpointError(f"saving {path} failed on rank 0")
        if name is None:
            self.last_save = time.monotonic()
        return path

    def _prune(self) -> None:
        for old in self.existing()[self.cfg.keep_last:]:
            old.unlink(missing_ok=True)

    def resume_state(self, resume: str) -> dict[str, Any] | None:
        """The state to start from: ``auto`` takes the newest readable checkpoint, ``never`` none."""
        if resume == "never":
            if self.existing():
                raise CheckpointError(
                    f"train.resume=never but {self.folder} holds checkpoints; use another run_dir or delete them"
                )
            return None
        if resume != "auto":
            return load_file(Path(resume).expanduser(), self.env.device) | {"path": resume}
        for path in self.existing():
            try:
                return load_file(path, self.env.device) | {"path": str(path)}
            except IncompatibleCheckpoint:
                raise
            except CheckpointError as e:
                if self.env.is_main:
                    warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=1)
        return None


def load_generator(path: str | Path, device: torch.device | str = "cpu",
                   use_ema: bool = True) -> tuple[torch.nn.Module, Config]:
    """G (its EMA when saved and ``use_ema``) in eval mode, rebuilt from the config the checkpoint carries.

    Tensors are mapped to ``device``, so a checkpoint trained on GPUs samples on a laptop.
    """
    path = Path(path)
    state = load_file(path, device)
    try:
        cfg = from_dict(Config, state["config"])
    except ConfigError as e:
        raise IncompatibleCheckpoint(f"checkpoint {path}: its config does not fit this gan_dist ({e})") from None
    generator = build_generator(cfg.model).to(device)
    weights = state.get("generator_ema") if use_ema and "generator_ema" in state else state["generator"]
    check_shapes(path, "generator", weights, generator)
    generator.load_state_dict(weights)
    return generator.eval().requires_grad_(False), cfg
