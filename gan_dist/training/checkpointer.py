"""The checkpointer: the run's component that saves every part by name at its cadence, keeps the newest
``checkpoint.keep_last`` of its own files, and restores the newest valid one."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gan_dist.checkpoint import (
    FORMAT_VERSION,
    ROLLING_NAME,
    CheckpointError,
    IncompatibleCheckpoint,
    Stateful,
    atomic_save,
    is_checkpoint,
    load_components,
    load_file,
    move_aside,
    rolling,
)
from gan_dist.config import CheckpointConfig, Diverged, write_reason
from gan_dist.training.position import Component, Context, Position

if TYPE_CHECKING:
    from gan_dist.dist import Agreed, DistEnv


MANIFEST = "saved.json"
"""In the checkpoints folder: the rolling checkpoints the run wrote, the only ones it ever prunes."""


class Checkpointer(Component):
    """Decides when to save, writes the components' states on rank 0 only, and restores them on resume.

    It saves every ``checkpoint.every_steps``, when rank 0's clock said ``every_minutes`` had passed
    (``time_due``, offered to the ranks' agreement and handed back to ``due``), and after the last step;
    ``finite`` is asked on every rank before each save, and weights that are not finite on any rank are never
    written.
    """

    final = True

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, env: DistEnv, components: Mapping[str, Stateful],
                 finite: Callable[[], bool] = lambda: True) -> None:
        self.cfg, self.env, self.components, self.finite = cfg, env, components, finite
        self.folder = run_dir / "checkpoints"
        self.last_save = time.monotonic()
        self.last_saved: Path | None = None
        """The newest rolling checkpoint this run wrote or resumed from."""
        self.named: set[str] = set()
        """Files in the folder that this run did not write, already named on the console."""
        self.listeners: list[Callable[[Path, int], None]] = []
        """Told of every file saved, on rank 0 (the logger's W&B artifacts)."""
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".step_*.pt.tmp*"):  # left by a crash mid-write
                stale.unlink(missing_ok=True)

    @classmethod
    def build(cls, cfg: CheckpointConfig, ctx: Context) -> Checkpointer:
        return cls(cfg, ctx.run_dir, ctx.env, ctx.states, ctx.engine.finite)

    def existing(self) -> list[Path]:
        """Rolling checkpoints, newest first."""
        return [p for _, p in self._by_step()]

    def _by_step(self) -> list[tuple[int, Path]]:
        return rolling(self.folder)[::-1]

    def due(self, pos: Position, agreed: Agreed) -> bool:
        return agreed.timed_save or (self.cfg.every_steps > 0 and pos.step % self.cfg.every_steps == 0)

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
            for listener in self.listeners:
                listener(path, step)
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
        """The rolling checkpoints this run wrote. A folder without a manifest starts it from the files that
        read as gan_dist checkpoints."""
        path = self.folder / MANIFEST
        try:
            return set(json.loads(path.read_text()))
        except FileNotFoundError:
            return {p.name for _, p in self._by_step() if is_checkpoint(p)}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}); delete it to start it afresh from the "
                                  "checkpoints that are there") from None

    def _write_manifest(self, names: set[str]) -> None:
        path = self.folder / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        try:
            tmp.write_text(json.dumps(sorted(names, key=lambda n: int(ROLLING_NAME.fullmatch(n).group(1)))) + "\n")
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
                move_aside(bad, why)
            return path, state
        if found:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"no checkpoint in {self.folder} is readable ({names}; the newest: {unreadable[0][1]}); "
                "move them away to start from step 0, or set train.resume=PATH"
            )
        return None
