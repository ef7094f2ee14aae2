"""One training run: config → distributed env → data → engine → components, driven by ``Trainer``.

``gan_dist.train`` is the command line in front of it; ``train(cfg, stop, Evaluator)`` below is what it
calls once its signal handlers are in place. ``build(cfg, env)`` gives the data and the engine alone (the
benchmark and the GPU check use it).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gan_dist import cli
from gan_dist.checkpoint import IncompatibleCheckpoint
from gan_dist.config import Config, ConfigError, DataError, DatasetInfo, Diverged, UsageError, WriteError
from gan_dist.configio import to_dict, to_yaml
from gan_dist.data.batches import ShardedBatches, make_batches
from gan_dist.data.cache import CHECKS, Split, load_split
from gan_dist.data.classes import class_notes
from gan_dist.dist import DistEnv, PeerFailed, StepAgreement, Stopped, StopPoints, lost_peer, setup, teardown
from gan_dist.evaluation.diversity import ZSpread
from gan_dist.models.base import check_resolution
from gan_dist.signals import StopFlag
from gan_dist.training.checkpointer import Checkpointer
from gan_dist.training.engine import GANEngine
from gan_dist.training.monitor import MetricLogger, Progress
from gan_dist.training.position import Component, Position
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


class Trainer:
    """Wires the components of one run and drives the loop; every rank runs the same calls.

    ``evaluator(cfg, env)`` builds the scorer for ``eval.every_steps``: the entry point passes
    ``gan_dist.evaluate.Evaluator``, so training does not import evaluation's judge and Inception.
    """

    def __init__(self, cfg: Config, env: DistEnv, stop: StopFlag,
                 evaluator: Callable[[Config, DistEnv], Evaluator]) -> None:
        self.env, self.stop = env, stop
        self.run_dir = Path(cfg.run_dir)
        env.raise_together(_prepare_run_dir(self.run_dir) if env.is_main else None)
        built = build(cfg, env)
        self.cfg, self.info, self.data, self.engine = built.cfg, built.info, built.data, built.engine
        engine = self.engine
        self.pos = Position(built.steps_per_epoch, cfg.train.n_critic, cfg.train.batch_size, env.world_size)
        self.total_steps = built.total_steps
        best, self.record = BestScore(cfg.eval.features), RunRecord(self.cfg, self.info, engine.ramps.length)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, env, {
            "run": self.record, "position": self.pos, "engine": engine, "best": best}, engine.finite)
        resumed = self.checkpointer.restore(cfg.train.resume)
        if resumed is not None:
            note = (f"; {self.pos.resharded}: data re-sharded, the run is no longer bit-exact"
                    if self.pos.resharded else "")
            self._say(f"resuming from {resumed} at {self.pos}{note}")
            if self.record.ramps_from is not None:
                self._say(f"schedule: the ramps span {engine.ramps.length:.0f} steps, not the checkpoint's "
                          f"{self.record.ramps_from:.0f} (the run's length changed; schedule.kimg fixes theirs): "
                          "the run is no longer bit-exact")
            if self.record.data_changes:
                self._say(f"data: differs from the checkpoint's ({'; '.join(self.record.data_changes)}); the run "
                          "goes on from the same step, and is no longer bit-exact")
        classes = engine.num_classes
        if classes == 1:
            self._say("data: one class: conditioning on it changes nothing; model.conditioning=none trains the "
                      "same data unconditionally")
        self._say("; ".join([f"data: {describe_data(self.info, built.split.name, classes)}", str(self.data),
                             f"cache keyed by {CHECKS[cfg.data.verify]}", *class_notes(built.split)]))
        self._say(f"precision: {self.cfg.amp.dtype} ({engine.amp.reason}); layout: {self.cfg.amp.memory_format}")
        self._say(f"loss: {engine.loss.summary}")
        if cfg.augment.kind != "none":
            self._say(f"augment: {engine.loss.augment}")
        if engine.ramps.ramps:
            self._say(f"schedule: {engine.ramps}")
        if engine.graphed and engine.graph_blockers():
            self._say(f"warning: train.compile=reduce-overhead: {', '.join(engine.graph_blockers())} change in place, "
                      "so CUDA graphs are likely skipped (TORCH_LOGS=cudagraphs says 'mutated inputs') and the run is "
                      "only compiled; train.compile=default compiles the same without the graphs' memory")
        env.raise_together(self._write_config() if env.is_main else None)
        probes = [p for p in (_spread_probe(cfg, env, built.split, engine),
                              (lambda: engine.ramps.at(self.pos.step - 1)) if engine.ramps.ramps else None) if p]
        self.logger = MetricLogger(cfg.log, env, self.run_dir, cfg.train.batch_size, engine.metric_names,
                                   lambda: engine.learning_rates, probes)
        self.components: list[Component] = [self.logger, SampleWriter(
            self.cfg, env, self.info, classes, lambda: engine.sampler, self.logger.log_image)]
        every = cfg.eval.every_steps
        if every > 0 and self.pos.step // every == self.total_steps // every:
            self._say(f"eval: eval.every_steps={every} falls on no step from {self.pos.step + 1} to the last, "
                      f"{self.total_steps}: nothing is scored, and the judge is not trained")
        elif every > 0:
            stop_points = StopPoints(env, lambda: self.stop.signum is not None)
            self.components.append(Evaluation(evaluator(self.cfg, env, stop=stop_points), self.logger, best,
                                              lambda: engine.sampler,
                                              self.checkpointer.save))
        self.components.append(self.checkpointer)  # after the others: its checkpoint holds what they did
        # Last: a start that fails before here leaves no W&B run open.
        wandb_config = to_dict(self.cfg) | {"resolved": {"amp": engine.amp.reason, "data": self.info.to_dict()}}
        self.record.wandb_id = self.logger.open_wandb(wandb_config, self.record.wandb_id)

    def _write_config(self) -> WriteError | None:
        """Rank 0 records the resolved config, once the resume check has passed (a refused start changes nothing)."""
        path = self.run_dir / "config.yaml"
        try:
            path.write_text(f"# amp.dtype: {self.engine.amp.reason}\n" + to_yaml(self.cfg))
        except OSError as e:
            return WriteError(path, e)
        return None

    def _say(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def fit(self) -> int:
        """Train to the last step, or until a stop signal (exit 75) or divergence (exit 3)."""
        cfg, pos = self.cfg, self.pos
        group = f" ({self.env.backend} process group)" if self.env.distributed else ""
        self._say(f"world size {self.env.world_size} on {self.env.device}{group}; global batch "
                  f"{cfg.train.batch_size * self.env.world_size}; {pos.steps_per_epoch} steps per epoch; "
                  f"training to step {self.total_steps}")
        if self.env.any(self.stop.signum is not None):
            self._say(f"stopped by signal ({self.stop.name}) before step {pos.step + 1}: nothing new to save; "
                      f"exit {cli.EXIT_REQUEUE} to requeue")
            return cli.EXIT_REQUEUE
        agreement = StepAgreement(self.env)
        try:
            code = self._loop(agreement)
        except Stopped as e:  # in a phase longer than a step (an evaluation): skipped; the step is saved
            agreement.drain()
            self._say(f"stopped by signal ({self.stop.name}) in {e.phase} at step {self.pos.step}: it is skipped")
            return self._stopped(interrupted=True)
        except Diverged as e:
            agreement.drain()
            last = self.checkpointer.last_saved
            kept = f"{last} is the newest and last good checkpoint" if last else "no checkpoint was saved"
            self._say(f"training diverged: {e}; nothing non-finite was saved; {kept}; exit {cli.EXIT_DIVERGED}")
            return cli.EXIT_DIVERGED
        agreement.drain()
        return code

    def _loop(self, agreement: StepAgreement) -> int:
        cfg, pos = self.cfg, self.pos
        progress = Progress(cfg.log, self.env, self.total_steps, pos.step, cfg.train.batch_size * self.env.world_size)
        try:
            while pos.step < self.total_steps:
                epoch = pos.epoch
                batches = self.data.epoch(epoch, start=pos.batch)
                while pos.epoch == epoch and pos.step < self.total_steps:
                    if self._step(agreement, batches):
                        return self._stopped()
                    progress.update(pos.step)
        finally:
            progress.close()
        self._catch_up(c for c in self.components if c.final)  # the last record, grid and checkpoint
        self._say(f"done: {pos.step} steps in {self.run_dir}")
        return 0

    def _step(self, agreement: StepAgreement, batches: Iterator[Any]) -> bool:
        """One iteration and the components due after it; returns whether the ranks agreed to stop."""
        pos = self.pos
        metrics = self.engine.iteration(pos.step, [next(batches) for _ in range(self.cfg.train.n_critic)])
        pos.advance()
        self.logger.update(pos.step, metrics)
        stopping, self.checkpointer.on_time = agreement.exchange(self.stop.signum is not None,
                                                                 self.checkpointer.time_due())
        for component in self.components:
            if component.due(pos):
                component.run(pos)
        return stopping

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
            if not component.due(self.pos):
                component.run(self.pos)

    def close(self) -> None:
        for component in self.components:
            component.close()


def _spread_probe(cfg: Config, env: DistEnv, split: Split,
                  engine: GANEngine) -> Callable[[], dict[str, float]] | None:
    """``log.z_spread``: the raw G's spread over z per class, for each log record. Every rank measures (the
    same latents, the same weights): G's BatchNorm may be a SyncBatchNorm, whose forward is a collective."""
    if not cfg.log.z_spread:
        return None
    z_spread = ZSpread(split, engine.num_classes, cfg.model.z_dim, cfg.train.seed, env.device, cfg.log.z_spread_warn)
    return lambda: z_spread.record(engine.generator, env.is_main)


class Evaluation(Component):
    """``eval.every_steps``: score the sampling G on every rank, log the scores, and keep ``best.pt``
    when FID improves. ``share_of_time`` is evaluation's share of the time since the run started."""

    def __init__(self, evaluator: Evaluator, logger: MetricLogger, best: BestScore,
                 sampler: Callable[[], nn.Module], save: Callable[..., Path]) -> None:
        self.evaluator, self.logger, self.best, self.sampler, self.save = evaluator, logger, best, sampler, save
        self.seconds, self.start = 0.0, time.perf_counter()

    def due(self, pos: Position) -> bool:
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


def describe_data(info: DatasetInfo, split: str, classes: int) -> str:
    """One line for the start of a run: what the networks were built for."""
    labels = f"{classes} classes" if classes else "unconditional"
    c, h, w = info.shape
    return f"{info.name} {split} ({info.sizes.get(split, '?')} images, {c}×{h}×{w}, {labels}) from {info.source}"


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
