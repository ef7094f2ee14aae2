"""One training run: config → distributed env → data → engine → components, driven by ``Trainer``.

``gan_dist.train`` is the command line in front of it; ``train(cfg, stop, Evaluator)`` below is what it
calls once its signal handlers are in place. ``build(cfg, env)`` gives the data and the engine alone (the
benchmark and the GPU check use it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gan_dist import cli
from gan_dist.checkpoint import IncompatibleCheckpoint
from gan_dist.config import Config, ConfigError, DataError, DatasetInfo, Diverged, EvalConfig, UsageError, WriteError
from gan_dist.configio import to_dict, to_yaml
from gan_dist.data.batches import ShardedBatches, make_batches, start_lines
from gan_dist.data.cache import Split, load_split
from gan_dist.dist import Agreed, DistEnv, PeerFailed, StepAgreement, Stopped, StopPoints, lost_peer, setup, teardown
from gan_dist.models.base import check_resolution
from gan_dist.signals import StopFlag
from gan_dist.training.checkpointer import Checkpointer
from gan_dist.training.engine import GANEngine
from gan_dist.training.monitor import MetricLogger, Progress
from gan_dist.training.position import Component, Context, Position, iterations
from gan_dist.training.ramps import run_steps
from gan_dist.training.samples import SampleWriter

if TYPE_CHECKING:
    from gan_dist.evaluation.evaluator import Evaluator


@dataclass
class Built:
    """What a config makes on one rank: its split's batches and the engine, and the config as resolved."""

    cfg: Config
    """``amp`` replaced by what ``auto`` chose: what the run records."""
    info: DatasetInfo
    split: Split
    data: ShardedBatches
    engine: GANEngine
    steps_per_epoch: int
    total_steps: int
    """The run's length: the first of ``train.epochs``, ``max_steps`` and ``kimg`` to end it."""


def build(cfg: Config, env: DistEnv) -> Built:
    """config → env → data → engine: the one wiring of the trainer, the benchmark and the GPU check."""
    if cfg.data.resolution is not None:
        check_resolution(cfg.model, cfg.data.resolution)
    split = load_split(cfg.data, env)
    data = make_batches(split, cfg.data, env, cfg.train.batch_size, cfg.train.seed)
    steps_per_epoch = len(data) // cfg.train.n_critic
    if steps_per_epoch == 0:
        raise DataError(f"{len(data)} batches per rank cannot feed train.n_critic={cfg.train.n_critic}")
    total = run_steps(cfg.train, steps_per_epoch, cfg.train.batch_size * env.world_size)
    counts = torch.from_numpy(np.bincount(split.labels, minlength=split.info.num_classes))
    engine = GANEngine(cfg, env, split.info, total, counts)
    return Built(dataclasses.replace(cfg, amp=engine.amp.config), split.info, split, data, engine, steps_per_epoch,
                 total)


class BestScore:
    """The best FID so far: ``best.pt`` is rewritten only when an evaluation beats it. FIDs of the two
    feature spaces do not compare: a resume in the other space starts the best afresh."""

    def __init__(self, features: str) -> None:
        self.fid, self.features = math.inf, features

    def improves(self, fid: float) -> bool:
        if fid < self.fid:
            self.fid = fid
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"fid": self.fid, "features": self.features}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("features", "judge") == self.features:
            self.fid = state["fid"]


class RunRecord:
    """What a checkpoint says of its run: the resolved config, the data's description and the W&B run id.

    Resuming on other data is refused, not mixed in; the W&B id lets a requeued run log into the same run.
    """

    def __init__(self, cfg: Config, info: DatasetInfo, ramp_steps: float) -> None:
        self.cfg, self.info, self.ramp_steps = cfg, info, ramp_steps
        self.wandb_id: str | None = None
        self.data_changes: list[str] = []
        """How the data of the same shape and classes differs from the checkpoint's (files added or removed)."""
        self.ramps_from: float | None = None
        """The steps the checkpoint's ramps spanned, when they spanned others (the run's length changed)."""

    def state_dict(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "data": self.info.to_dict(), "wandb_run_id": self.wandb_id,
                "ramp_steps": self.ramp_steps,
                "rng": {"seed": self.cfg.train.seed, "scheme": "blake2b(seed/rank/step/phase) reseeded every step"}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = DatasetInfo.from_dict(state["data"])
        if any(getattr(saved, f) != getattr(self.info, f) for f in ("name", "shape", "num_classes")):
            def show(i: DatasetInfo) -> str:
                return f"{i.name}, {i.channels}×{i.resolution}×{i.resolution}, {i.num_classes} classes"
            raise IncompatibleCheckpoint(f"trained on {show(saved)}; this run's data is {show(self.info)}; "
                                         "use another run_dir, or the data it was trained on")
        self.wandb_id = state.get("wandb_run_id")
        if self.cfg.schedule.ramps() and state.get("ramp_steps", self.ramp_steps) != self.ramp_steps:
            self.ramps_from = state["ramp_steps"]
        self.data_changes = [f"{split}: {saved.sizes.get(split, 0)} images then, {n} now"
                             for split, n in self.info.sizes.items() if saved.sizes.get(split, 0) != n]
        if saved.class_names != self.info.class_names:
            self.data_changes.append(f"class names {', '.join(saved.class_names[:3])}... then")
        if saved.source != self.info.source:
            self.data_changes.append(f"from {saved.source} then")

    def resume_lines(self, resumed: Path | None, pos: Position) -> list[str]:
        """What the run's start says of the checkpoint it resumes from, and of what makes it no longer bit-exact."""
        if resumed is None:
            return []
        note = f"; {pos.resharded}: data re-sharded, the run is no longer bit-exact" if pos.resharded else ""
        lines = [f"resuming from {resumed} at {pos}{note}"]
        if self.ramps_from is not None:
            lines.append(f"schedule: the ramps span {self.ramp_steps:.0f} steps, not the checkpoint's "
                         f"{self.ramps_from:.0f} (the run's length changed; schedule.kimg fixes theirs): the run is no "
                         "longer bit-exact")
        if self.data_changes:
            lines.append(f"data: differs from the checkpoint's ({'; '.join(self.data_changes)}); the run goes on "
                         "from the same step, and is no longer bit-exact")
        return lines


class Trainer:
    """Builds the components of one run from their sections and drives the loop; every rank runs the same calls.

    ``evaluator(cfg, env, stop=...)`` builds the scorer for ``eval.every_steps``: the entry point passes
    ``gan_dist.evaluate.Evaluator``, so training does not import evaluation's judge and Inception.
    """

    def __init__(self, cfg: Config, env: DistEnv, stop: StopFlag, evaluator: Callable[..., Evaluator]) -> None:
        self.env, self.stop, self.run_dir = env, stop, Path(cfg.run_dir)
        env.raise_together(_prepare_run_dir(self.run_dir) if env.is_main else None)
        built = build(cfg, env)
        self.cfg, self.data, self.engine, self.total_steps = built.cfg, built.data, built.engine, built.total_steps
        self.pos = Position(built.steps_per_epoch, cfg.train.n_critic, cfg.train.batch_size, env.world_size)
        record = RunRecord(self.cfg, built.info, self.engine.ramps.length)
        states = {"run": record, "position": self.pos, "engine": self.engine, "best": BestScore(cfg.eval.features)}
        stop_points = StopPoints(env, lambda: self.stop.signum is not None)
        ctx = Context(env, self.run_dir, built.split, self.engine, cfg.train.seed, cfg.model.z_dim,
                      cfg.train.batch_size, states, lambda: evaluator(self.cfg, env, stop=stop_points))
        self.checkpointer = Checkpointer.build(cfg.checkpoint, ctx)
        resumed = self.checkpointer.restore(cfg.train.resume)
        data_lines = start_lines(built.split, self.data, cfg.data.verify, self.engine.label_classes)
        self._say(*record.resume_lines(resumed, self.pos), *data_lines, *self.engine.start_lines(),
                  *Evaluation.notes(cfg.eval, self.pos, self.total_steps))
        env.raise_together(self._write_config() if env.is_main else None)
        self.logger = MetricLogger.build(cfg.log, ctx)
        self.checkpointer.listeners.append(self.logger.checkpoint_saved)
        ctx = dataclasses.replace(ctx, sink=self.logger, save=self.checkpointer.save)
        self.components: list[Component] = [self.logger, SampleWriter.build(cfg.log, ctx),
                                            *Evaluation.build(cfg.eval, ctx, self.pos, self.total_steps),
                                            self.checkpointer]  # the checkpointer last: it saves what they did
        self.agreed = Agreed()
        # Last: a start that fails before here leaves no W&B run open.
        wandb_config = to_dict(self.cfg) | {"resolved": {"amp": self.engine.amp.reason, "data": built.info.to_dict()}}
        record.wandb_id = self.logger.open_wandb(wandb_config, record.wandb_id)

    def _write_config(self) -> WriteError | None:
        """Rank 0 records the resolved config, once the resume check has passed (a refused start changes nothing)."""
        path = self.run_dir / "config.yaml"
        try:
            path.write_text(f"# amp.dtype: {self.engine.amp.reason}\n" + to_yaml(self.cfg))
        except OSError as e:
            return WriteError(path, e)
        return None

    def _say(self, *lines: str) -> None:
        if self.env.is_main and lines:
            print(*lines, sep="\n", flush=True)

    def fit(self) -> int:
        """Train to the last step, or until a stop signal (exit 75) or divergence (exit 3)."""
        pos, env, batch = self.pos, self.env, self.cfg.train.batch_size * self.env.world_size
        group = f" ({env.backend} process group)" if env.distributed else ""
        self._say(f"world size {env.world_size} on {env.device}{group}; global batch {batch}; "
                  f"{pos.steps_per_epoch} steps per epoch; training to step {self.total_steps}")
        if env.any(self.stop.signum is not None):
            self._say(f"stopped by signal ({self.stop.name}) before step {pos.step + 1}: nothing new to save; "
                      f"exit {cli.EXIT_REQUEUE} to requeue")
            return cli.EXIT_REQUEUE
        agreement = StepAgreement(env)
        try:
            with contextlib.ExitStack() as finish:
                finish.callback(agreement.drain)
                return self._loop(agreement, Progress(self.cfg.log, env, self.total_steps, pos.step, batch))
        except Stopped as e:  # in a phase longer than a step (an evaluation): skipped; the step is saved
            self._say(f"stopped by signal ({self.stop.name}) in {e.phase} at step {pos.step}: it is skipped")
            return self._stopped(interrupted=True)
        except Diverged as e:
            last = self.checkpointer.last_saved
            kept = f"{last} is the newest and last good checkpoint" if last else "no checkpoint was saved"
            self._say(f"training diverged: {e}; nothing non-finite was saved; {kept}; exit {cli.EXIT_DIVERGED}")
            return cli.EXIT_DIVERGED

    def _loop(self, agreement: StepAgreement, progress: Progress) -> int:
        pos = self.pos
        with contextlib.closing(progress):
            for batches in iterations(self.data, pos, self.total_steps):
                metrics = self.engine.iteration(pos.step, batches)
                pos.advance()
                self.logger.update(pos.step, metrics)
                self.agreed = agreement.exchange(self.stop.signum is not None, self.checkpointer.time_due())
                for component in self.components:
                    if component.due(pos, self.agreed):
                        component.run(pos)
                if self.agreed.stop:
                    return self._stopped()
                progress.update(pos.step)
        self._catch_up(c for c in self.components if c.final)  # the last record, grid and checkpoint
        self._say(f"done: {pos.step} steps in {self.run_dir}")
        return 0

    def _stopped(self, interrupted: bool = False) -> int:
        """The ranks agreed to stop at this step: save, settle the exit status, write the last record. When a
        component was ``interrupted``, the checkpointer after it has not run at this step, due or not."""
        if interrupted:
            self.checkpointer.run(self.pos)
        else:
            self._catch_up([self.checkpointer])
        self.stop.settle()  # saved: the exit status is decided
        self._catch_up([self.logger])
        self._say(f"stopped by signal ({self.stop.name}) at step {self.pos.step}; exit {cli.EXIT_REQUEUE} to requeue")
        return cli.EXIT_REQUEUE

    def _catch_up(self, components: Iterable[Component]) -> None:
        """Run each of ``components`` at this step, unless it was due here and has just run."""
        for component in components:
            if not component.due(self.pos, self.agreed):
                component.run(self.pos)

    def close(self) -> None:
        for component in self.components:
            component.close()


class Evaluation(Component):
    """``eval.every_steps``: score the sampling G on every rank, log the scores, and keep ``best.pt``
    when FID improves. ``share_of_time`` is evaluation's share of the time since the run started."""

    def __init__(self, evaluator: Evaluator, logger: MetricLogger, best: BestScore,
                 sampler: Callable[[], nn.Module], save: Callable[..., Path]) -> None:
        self.evaluator, self.logger, self.best, self.sampler, self.save = evaluator, logger, best, sampler, save
        self.seconds, self.start = 0.0, time.perf_counter()

    @staticmethod
    def never_due(cfg: EvalConfig, pos: Position, total_steps: int) -> bool:
        return cfg.every_steps > 0 and pos.step // cfg.every_steps == total_steps // cfg.every_steps

    @classmethod
    def notes(cls, cfg: EvalConfig, pos: Position, total_steps: int) -> list[str]:
        if not cls.never_due(cfg, pos, total_steps):
            return []
        return [f"eval: eval.every_steps={cfg.every_steps} falls on no step from {pos.step + 1} to the last, "
                f"{total_steps}: nothing is scored, and the judge is not trained"]

    @classmethod
    def build(cls, cfg: EvalConfig, ctx: Context, pos: Position, total_steps: int) -> list[Evaluation]:
        """The evaluation, or none when ``eval.every_steps`` is 0 or falls on no step left (no judge is trained)."""
        if cfg.every_steps == 0 or cls.never_due(cfg, pos, total_steps):
            return []
        engine = ctx.engine
        return [cls(ctx.evaluator(), ctx.sink, ctx.states["best"], lambda: engine.sampler, ctx.save)]

    def due(self, pos: Position, agreed: Agreed) -> bool:
        return self.evaluator.due(pos.step)

    def run(self, pos: Position) -> None:
        scores = self.evaluator.run(self.sampler())
        self.seconds += scores["seconds"]
        scores["share_of_time"] = self.seconds / max(time.perf_counter() - self.start, 1e-9)
        self.logger.log_eval(pos.step, pos.epoch, scores)
        if self.best.improves(scores["fid"]):
            if self.evaluator.env.is_main:
                print(f"new best FID {self.best.fid:.3f}", flush=True)
            self.save(pos.step, name="best.pt")


def _prepare_run_dir(run_dir: Path) -> ConfigError | None:
    """Create ``run_dir``, or say why it cannot hold a run (a file, read-only, no permission)."""
    if run_dir.exists() and not run_dir.is_dir():
        return ConfigError(f"run_dir: {run_dir} exists and is not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return ConfigError(f"run_dir: cannot create {run_dir}: {e.strerror or e}")
    if not os.access(run_dir, os.W_OK):
        return ConfigError(f"run_dir: {run_dir} is not writable (read-only file system or permissions)")
    return None


def train(cfg: Config, stop: StopFlag, evaluator: Callable[[Config, DistEnv], Evaluator]) -> int:
    """Join the process group, train, leave it. An error names its rank and is printed last, after the
    group is gone, so it is the line right above a launcher's summary."""
    env = trainer = None
    reason = None
    try:
        env = setup(cfg.dist)
        trainer = Trainer(cfg, env, stop, evaluator)
        return trainer.fit()
    except UsageError as e:
        reason = cli.error_line(e, env.rank if env else int(os.environ.get("RANK", 0)))
        return cli.EXIT_USAGE
    except PeerFailed as e:  # every rank is here: the ranks that failed say why before any rank exits
        if e.cause is not None:
            print(cli.error_line(e.cause, env.rank), file=sys.stderr, flush=True)
        env.barrier()
        return cli.EXIT_USAGE
    except RuntimeError as e:
        if env is None or not env.distributed or not lost_peer(e):
            raise
        reason = cli.error_line(f"lost a peer: a collective failed ({str(e).splitlines()[0]}); every checkpoint "
                                "on disk is complete, and relaunching resumes from the newest", env.rank)
        return cli.EXIT_LOST_PEER
    except Stopped as e:  # every rank agreed, before training began
        if env.is_main:
            print(f"stopped by signal ({stop.name}) in {e.phase}, before the first step: nothing new to save; "
                  f"exit {cli.EXIT_REQUEUE} to requeue", flush=True)
        return cli.EXIT_REQUEUE
    except KeyboardInterrupt:
        reason = "aborted by a second interrupt; every checkpoint on disk is complete"
        return cli.EXIT_ABORTED
    finally:
        stop.settle()
        if trainer is not None:
            trainer.close()
        if env is not None:
            teardown(env)
        # Collect the trainer, and the tensors of the collectives its DDP modules and step agreement
        # issued, while the interpreter is whole: freed during its shutdown (by a reference cycle a
        # component or a user's extension may hold), gloo's work objects take the GIL and abort.
        trainer = None
        gc.collect()
        if reason:
            print(reason, file=sys.stderr, flush=True)
