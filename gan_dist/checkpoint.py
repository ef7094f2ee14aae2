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
from gan_dist.data import DatasetInfo, idx_description
from gan_dist.dist import DistEnv
from gan_dist.models import build_generator

FORMAT_VERSION = 2
"""2 adds ``data``, the dataset's description; a version 1 checkpoint was always MNIST-format data."""
REQUIRED = ("format_version", "generator", "discriminator", "opt_g", "opt_d", "scaler", "step", "epoch", "batch",
            "world_size", "config", "data")
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
    except BaseException:  # an abort (a second Ctrl-C) mid-write leaves no partial file either
        tmp.unlink(missing_ok=True)
        raise


def _reason(e: Exception) -> str:
    """What is wrong, in one line: torch puts a ``weights_only`` refusal after paragraphs of advice."""
    text = str(e)
    _, refused, why = text.partition("WeightsUnpickler error: ")
    if refused:
        return f"weights_only refused it: {why.splitlines()[0].split('. ')[0]}"
    lines = text.strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_file(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read and sanity-check one checkpoint; raise ``CheckpointError`` if it is not usable at all."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle opcode, non-allowlisted global, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({_reason(e)})") from None
    if isinstance(state, dict) and state.get("format_version") == 1:
        state = _from_version_1(path, state)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {path} is not a gan_dist checkpoint (missing {', '.join(missing)})")
    if state["format_version"] != FORMAT_VERSION:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} has format version {state['format_version']}; this gan_dist reads {FORMAT_VERSION}"
        )
    return state


def _from_version_1(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 knew only mnist and fashion_mnist, whose description follows from the name."""
    name = state.get("config", {}).get("data", {}).get("name", "mnist")
    try:
        info = idx_description(name, source=f"{name} (from a version 1 checkpoint)")
    except KeyError:
        raise IncompatibleCheckpoint(f"checkpoint {path} has format version 1 and data.name={name!r}, "
                                     "which version 1 never wrote") from None
    return state | {"format_version": FORMAT_VERSION, "data": info.to_dict()}


def check_data(path: Path, saved: DatasetInfo, current: DatasetInfo) -> None:
    """A run resumes on the data it was trained on: another dataset or shape is refused, not mixed in."""
    fields = ("name", "shape", "num_classes")
    if any(getattr(saved, f) != getattr(current, f) for f in fields):
        def show(i: DatasetInfo) -> str:
            return f"{i.name}, {i.channels}×{i.resolution}×{i.resolution}, {i.num_classes} classes"
        raise IncompatibleCheckpoint(f"checkpoint {path} was trained on {show(saved)}; this run's data is "
                                     f"{show(current)}; use another run_dir, or the data it was trained on")


def check_finite(path: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights that hold NaN or infinity: a diverged run's G draws nothing but blank images."""
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path}: {name} has non-finite values in {len(bad)} tensor(s) "
                              f"({', '.join(bad[:3])}); the run diverged before this save, use an earlier checkpoint")


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
        return [p for _, p in self._by_step()]

    def _by_step(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.folder.glob("step_*.pt") if (m := _NAME.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def due(self, step: int) -> bool:
        """A save by step count: the same answer on every rank."""
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def time_due(self) -> bool:
        """A save by this rank's clock. Clocks differ, so only rank 0's answer may decide (``StepAgreement``)."""
        return self.cfg.every_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes

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
                    self._prune(state["step"])
            except CheckpointError as e:
                error = e
        # The agreement is the barrier: no rank runs ahead into steps that a failed save would lose.
        if self.env.any(error is not None):
            raise error or CheckpointError(f"saving {path} failed on rank 0")
        if name is None:
            self.last_save = time.monotonic()
        return path

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep_last`` checkpoints up to the one just saved at ``step``.

        A file with a later step is not this run's past (a stale copy, or a run resumed from an older
        file): it is never deleted, and never counted, so it cannot push out a fresh save.
        """
        ours = [p for saved, p in self._by_step() if saved <= step]
        for old in ours[self.cfg.keep_last:]:
            old.unlink(missing_ok=True)

    def resume_state(self, resume: str) -> dict[str, Any] | None:
        """The state to start from, the same on every rank. Every rank calls this.

        Rank 0 alone lists the folder, checks readability and chooses (``auto``: the newest readable
        checkpoint; ``never``: none; else a path); the other ranks load the file it names, so a stale
        directory listing on one node cannot start ranks from different steps. Each rank checks that
        it read the step rank 0 read, and if one did not, all ranks raise together.
        """
        state: dict[str, Any] | None = None
        choice: tuple[str, int] | CheckpointError | None = None
        if self.env.is_main:
            try:
                state = self._choose(resume)
                choice = None if state is None else (state["path"], state["step"])
            except CheckpointError as e:
                choice = e
        choice = self.env.broadcast_object(choice)
        if isinstance(choice, CheckpointError):
            raise choice
        if choice is None:
            return None
        path, step = choice
        error: CheckpointError | None = None
        if not self.env.is_main:
            try:
                state = load_file(Path(path), self.env.device) | {"path": path}
                if state["step"] != step:
                    error = CheckpointError(
                        f"rank {self.env.rank} read step {state['step']} from {path}, rank 0 read step {step}; "
                        "all ranks must see the same run_dir (a shared file system with stale caches?)"
                    )
            except CheckpointError as e:
                error = e
        if self.env.any(error is not None):
            raise error or CheckpointError(f"another rank could not resume from {path} at step {step}; see its error")
        return state

    def _choose(self, resume: str) -> dict[str, Any] | None:
        """Rank 0's pick, loaded; unreadable files newer than it are moved aside, so no later save sees them."""
        if resume == "never":
            if self.existing():
                raise CheckpointError(
                    f"train.resume=never but {self.folder} holds checkpoints; use another run_dir or delete them"
                )
            return None
        if resume != "auto":
            return load_file(Path(resume).expanduser(), self.env.device) | {"path": resume}
        found = self.existing()
        unreadable: list[tuple[Path, CheckpointError]] = []
        for path in found:
            try:
                state = load_file(path, self.env.device) | {"path": str(path)}
            except IncompatibleCheckpoint:
                raise
            except CheckpointError as e:
                unreadable.append((path, e))
                continue
            for bad, why in unreadable:
                _move_aside(bad, why)
            return state
        if found:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"no checkpoint in {self.folder} is readable ({names}; the newest: {unreadable[0][1]}); "
                "move them away to start from step 0, or set train.resume=PATH"
            )
        return None


def _move_aside(path: Path, why: CheckpointError) -> None:
    """Rename an unreadable checkpoint to ``<name>.corrupt``: kept for a look, out of resume's and pruning's way."""
    target = path.with_name(f"{path.name}.corrupt")
    try:
        path.rename(target)
    except OSError as e:
        raise CheckpointError(f"{why}; moving it aside to {target.name} failed: {e.strerror}") from None
    warnings.warn(f"{why}; moved it aside to {target.name}, resuming from an older checkpoint", stacklevel=1)


def load_generator(path: str | Path, device: torch.device | str = "cpu",
                   use_ema: bool = True) -> tuple[torch.nn.Module, Config, DatasetInfo]:
    """G (its EMA when saved and ``use_ema``) in eval mode, rebuilt from the config and data description
    the checkpoint carries, so no data is needed.

    Tensors are mapped to ``device``, so a checkpoint trained on GPUs samples on a laptop.
    """
    path = Path(path)
    state = load_file(path, device)
    try:
        cfg = from_dict(Config, state["config"])
    except ConfigError as e:
        raise IncompatibleCheckpoint(f"checkpoint {path}: its config does not fit this gan_dist ({e})") from None
    info = DatasetInfo.from_dict(state["data"])
    generator = build_generator(cfg.model, info).to(device)
    name = "generator_ema" if use_ema and "generator_ema" in state else "generator"
    weights = state[name]
    check_finite(path, name, weights)
    check_shapes(path, "generator", weights, generator)
    generator.load_state_dict(weights)
    return generator.eval().requires_grad_(False), cfg, info
