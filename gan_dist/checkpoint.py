"""Atomic rank-0 checkpoints of a run's components, rolling retention, and resume past broken files.

The checkpointer is given the run's parts by name (engine, position, best score, run record); each
saves and loads its own state, and a checkpoint is ``{"format_version", "step", <name>: <state>}``.
It is a plain dict of tensors and builtins, so ``torch.load(weights_only=True)`` reads it without
running pickled code. It is written to a temporary file in the same folder, fsynced, renamed over
``step_<N>.pt`` and the folder fsynced: a crash at any instant leaves either the old set or the new
file, never a half-file under a valid name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from gan_dist.config import CheckpointConfig, Diverged, UsageError, write_reason
from gan_dist.schedule import Component, Position

if TYPE_CHECKING:
    from gan_dist.dist import DistEnv

FORMAT_VERSION = 3
"""3: one entry per component. Formats 1 and 2 (flat) came from builds before the first release and
are refused, naming their version."""
REQUIRED = ("format_version", "step", "run", "engine")
"""What every reader needs: the step, the run record (config, data) and the engine (the weights)."""
_NAME = re.compile(r"step_(\d+)\.pt")
MANIFEST = "saved.json"
"""In the checkpoints folder: the rolling checkpoints the run wrote, the only ones it ever prunes."""


class Stateful(Protocol):
    """A part of a run that saves and restores itself: plain tensors and builtins only."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be written or does not fit this run."""


class IncompatibleCheckpoint(CheckpointError):
    """Readable but not for this run (format, data or model shape): never silently skipped."""


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Components refuse a state without knowing its file; the refusal leaves here naming it."""
    try:
        yield
    except IncompatibleCheckpoint as e:
        raise IncompatibleCheckpoint(f"checkpoint {path}: {e}") from None


def rolling(folder: Path) -> list[tuple[int, Path]]:
    """The rolling checkpoints ``step_<N>.pt`` in ``folder``, by step, oldest first."""
    return sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.fullmatch(p.name)))


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
        raise CheckpointError(f"saving checkpoint {path} failed (disk full?): {write_reason(e)}") from e
    except BaseException:  # an abort (a second Ctrl-C) mid-write leaves no partial file either
        tmp.unlink(missing_ok=True)
        raise


ZIP_MAGIC = b"PK\x03\x04"
"""How every torch.save file begins (a zip archive, since torch 1.6); a truncated one still does."""


def _reason(e: Exception) -> str:
    """What is wrong, in one line: torch puts a ``weights_only`` refusal after paragraphs of advice."""
    text = str(e)
    _, refused, why = text.partition("WeightsUnpickler error: ")
    if refused:
        first = next((line for line in why.splitlines() if line.strip()), "")
        return f"it holds objects other than tensors and builtins: {first.split('. ')[0]}"
    lines = text.strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` reads as a gan_dist checkpoint (its tensors memory-mapped, not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable, or not torch.save's: not ours to delete
        return False
    return isinstance(state, dict) and all(k in state for k in REQUIRED)


def load_file(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read and sanity-check one checkpoint; ``CheckpointError`` if it is not usable at all."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        state = torch.load(path, map_location=device, weights_only=True) if magic == ZIP_MAGIC else None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle opcode, non-allowlisted global, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({_reason(e)})") from None
    if state is None:
        raise CheckpointError(f"{path} is not a gan_dist checkpoint: not a torch.save archive (a plain pickle, "
                              "or another file)")
    version = state.get("format_version", FORMAT_VERSION) if isinstance(state, dict) else FORMAT_VERSION
    if version != FORMAT_VERSION:
        raise IncompatibleCheckpoint(f"checkpoint {path} has format version {version}; this gan_dist reads "
                                     f"{FORMAT_VERSION}")
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a gan_dist checkpoint (missing {', '.join(missing)})")
    return state


def check_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights that hold NaN or infinity: a diverged run's G draws nothing but blank images."""
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise IncompatibleCheckpoint(f"{name} has non-finite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}); "
                                     "the run diverged before this save, use an earlier checkpoint")


def check_shapes(name: str, saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Compare a saved state dict with the model this config builds; say what differs."""
    own = model.state_dict()
    if saved.keys() != own.keys():
        extra, missing = sorted(saved.keys() - own.keys()), sorted(own.keys() - saved.keys())
        raise IncompatibleCheckpoint(f"{name} has other layers than this config builds (only in checkpoint: "
                                     f"{extra[:3]}, only in config: {missing[:3]}); check model.*")
    for key, tensor in own.items():
        if saved[key].shape != tensor.shape:
            raise IncompatibleCheckpoint(f"{name}.{key} has shape {tuple(saved[key].shape)}, this config builds "
                                         f"{tuple(tensor.shape)}; check model.*")


def load_components(path: Path, state: dict[str, Any], components: Mapping[str, Stateful]) -> None:
    """Each component loads its own entry, in the mapping's order; a refusal names the file."""
    missing = [name for name in components if name not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a gan_dist checkpoint (missing {', '.join(missing)})")
    with naming(path):
        for name, component in components.items():
            component.load_state_dict(state[name])


class Checkpointer(Component):
    """Decides when to save, writes the components' states on rank 0 only, and restores them on resume.

    It saves every ``checkpoint.every_steps``, when rank 0's clock says ``every_minutes`` have passed
    (``on_time``, as the ranks agreed it), and after the last step; ``finite`` is asked on every rank
    before each save, and weights that are not finite on any rank are never written.
    """

    final = True

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, env: DistEnv, components: Mapping[str, Stateful],
                 finite: Callable[[], bool] = lambda: True) -> None:
        self.cfg, self.env, self.components, self.finite = cfg, env, components, finite
        self.folder = run_dir / "checkpoints"
        self.last_save = time.monotonic()
        self.on_time = False
        """Rank 0's clock asked for a save, as the ranks agreed (``StepAgreement``): the same on every rank."""
        self.last_saved: Path | None = None
        """The newest rolling checkpoint this run wrote or resumed from."""
        self.named: set[str] = set()
        """Files in the folder that this run did not write, already named on the console."""
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".step_*.pt.tmp*"):  # left by a crash mid-write
                stale.unlink(missing_ok=True)

    def existing(self) -> list[Path]:
        """Rolling checkpoints, newest first."""
        return [p for _, p in self._by_step()]

    def _by_step(self) -> list[tuple[int, Path]]:
        return rolling(self.folder)[::-1]

    def due(self, pos: Position) -> bool:
        return self.on_time or (self.cfg.every_steps > 0 and pos.step % self.cfg.every_steps == 0)

    def run(self, pos: Position) -> None:
        self.save(pos.step)

    def time_due(self) -> bool:
        """A save by this rank's clock. Clocks differ, so only rank 0's answer may decide (``StepAgreement``).

        It answers yes once per interval: the agreement brings the save a step later, and asking
        again meanwhile would save at two steps in a row."""
        now = time.monotonic()
        if self.cfg.every_minutes > 0 and now - self.last_save >= 60 * self.cfg.every_minutes:
            self.last_save = now
            return True
        return False

    def state(self, step: int) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "step": step} | {
            name: component.state_dict() for name, component in self.components.items()}

    def save(self, step: int, name: str | None = None) -> Path:
        """Every rank calls this. Rank 0 writes; all ranks then agree that it worked, or all raise.

        By default the file is the rolling ``step_<N>.pt``; ``name`` writes another (``best.pt``).
        """
        if self.env.any(not self.finite()):
            raise Diverged(f"non-finite weights at step {step}")
        path = self.folder / (name or f"step_{step}.pt")
        # The agreement is the barrier: no rank runs ahead into steps that a failed save would lose.
        with self.env.together(CheckpointError, CheckpointError(f"saving {path} failed on rank 0")):
            if self.env.is_main:
                atomic_save(self.state(step), path)
                if name is None:
                    self._prune(step, path.name)
        if name is None:
            self.last_save, self.last_saved = time.monotonic(), path
        if self.env.is_main:
            print(f"saved {path}", flush=True)
        return path

    def _prune(self, step: int, saved: str) -> None:
        """Keep the newest ``keep_last`` checkpoints this run wrote, up to ``saved``, just saved at ``step``.

        Only files in the run's manifest (``saved.json``) are ever deleted: a ``step_<N>.pt`` that another tool
        put there is named once and left alone. A file with a later step is not this run's past (a stale copy,
        or a run resumed from an older file): it is never deleted, and never counted.
        """
        written = self._manifest() | {saved}
        ours = [p for saved, p in self._by_step() if saved <= step and p.name in written]
        foreign = sorted(p.name for _, p in self._by_step() if p.name not in written and p.name not in self.named)
        if foreign:
            print(f"checkpoints: left alone, not written by this run: {', '.join(foreign)}", flush=True)
            self.named |= set(foreign)
        for old in ours[self.cfg.keep_last:]:
            old.unlink(missing_ok=True)
        self._write_manifest(written & {p.name for _, p in self._by_step()})

    def _manifest(self) -> set[str]:
        """The rolling checkpoints this run wrote. Runs from before the manifest start it from the files that
        read as gan_dist checkpoints."""
        path = self.folder / MANIFEST
        try:
            return set(json.loads(path.read_text()))
        except FileNotFoundError:
            return {p.name for _, p in self._by_step() if _is_checkpoint(p)}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}); delete it to start it afresh from the "
                                  "checkpoints that are there") from None

    def _write_manifest(self, names: set[str]) -> None:
        path = self.folder / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        try:
            tmp.write_text(json.dumps(sorted(names, key=lambda n: int(_NAME.fullmatch(n).group(1)))) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise CheckpointError(f"writing {path} failed: {write_reason(e)}") from None

    def restore(self, resume: str) -> Path | None:
        """Load the components from the checkpoint ``resume`` picks; returns its path (None: a fresh start).

        Every rank calls this. Rank 0 alone lists the folder, checks readability and chooses (``auto``:
        the newest readable checkpoint; ``never``: none; else a path); the other ranks load the file it
        names, so a stale directory listing on one node cannot start ranks from different steps. Each
        rank checks that it read the step rank 0 read, and if one did not, all ranks raise together.
        """
        state: dict[str, Any] | None = None
        choice: tuple[str, int] | CheckpointError | None = None
        if self.env.is_main:
            try:
                found = self._choose(resume)
                if found is not None:
                    choice, state = (str(found[0]), found[1]["step"]), found[1]
            except CheckpointError as e:
                choice = e
        choice = self.env.broadcast_object(choice)
        if isinstance(choice, CheckpointError):
            raise choice
        if choice is None:
            return None
        path, step = Path(choice[0]), choice[1]
        elsewhere = CheckpointError(f"another rank could not resume from {path} at step {step}; see its error")
        with self.env.together(CheckpointError, elsewhere):
            if not self.env.is_main:
                state = load_file(path, self.env.device)
                if state["step"] != step:
                    raise CheckpointError(
                        f"rank {self.env.rank} read step {state['step']} from {path}, rank 0 read step {step}; "
                        "all ranks must see the same run_dir (a shared file system with stale caches?)")
            load_components(path, state, self.components)
        self.last_saved = path
        return path

    def _choose(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        """Rank 0's pick, loaded; unreadable files newer than it are moved aside, so no later save sees them."""
        if resume == "never":
            if self.existing():
                raise CheckpointError(
                    f"train.resume=never but {self.folder} holds checkpoints; use another run_dir or delete them"
                )
            return None
        if resume != "auto":
            path = Path(resume).expanduser()
            return path, load_file(path, self.env.device)
        found = self.existing()
        unreadable: list[tuple[Path, CheckpointError]] = []
        for path in found:
            try:
                state = load_file(path, self.env.device)
            except IncompatibleCheckpoint:
                raise
            except CheckpointError as e:
                unreadable.append((path, e))
                continue
            for bad, why in unreadable:
                _move_aside(bad, why)
            return path, state
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
    print(f"warning: {why}; moved it aside to {target.name}, resuming from an older checkpoint", file=sys.stderr,
          flush=True)
