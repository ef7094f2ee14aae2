"""Train a conditional GAN, on one process or many.

One process (CPU or one GPU):
    python -m gan_dist.train --config configs/mnist_dcgan.yaml
Several ranks on one machine (NCCL on GPUs, gloo on CPU):
    torchrun --nproc_per_node=4 -m gan_dist.train --config configs/mnist_dcgan.yaml train.batch_size=128
Offline, on Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist):
    python -m gan_dist.train data.name=fashion_mnist data.root=/usr/share/datasets/fashion-mnist
Slurm: python -m launch.slurm (it ends up in ``main`` below, with the same arguments).

``--help`` lists every config key; ``--dry-run`` prints the resolved config and exits.
Exit status: 0 done; 2 bad config, data, checkpoint or run_dir; 3 diverged (non-finite losses or
weights: nothing non-finite is saved, the newest checkpoint is the last good one); 75 stopped by a
signal after saving (requeue me); 130 aborted by a second Ctrl-C (no partial file is left).
Under torchrun these arrive as torchrun's exit 1; its summary table lists each rank's own status.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gan_dist.checkpoint import FORMAT_VERSION, Checkpointer, CheckpointError, check_data, check_shapes
from gan_dist.config import Config, ConfigError, describe, load_config, to_dict, to_yaml
from gan_dist.data import DataError, DatasetInfo, load_split, make_batches
from gan_dist.dist import DistEnv, PeerFailed, StepAgreement, setup, teardown
from gan_dist.engine import GANEngine
from gan_dist.evaluate import Evaluator
from gan_dist.monitor import Diverged, MetricLogger, SampleWriter, start_wandb

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped cleanly on a signal, a checkpoint is on disk
EXIT_ABORTED = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM, SIGUSR1, SIGUSR2 or a first SIGINT (Ctrl-C). The handler only records the
    signal: the ranks agree on it at a step boundary, outside any handler, then save and exit
    together. A second SIGINT aborts at once (``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if signum == signal.SIGINT:  # os.write: print() is not safe inside a signal handler
            os.write(sys.stderr.fileno(), b"interrupt: saving at the next step boundary; interrupt again to abort\n")

    @property
    def name(self) -> str:
        """The signal seen here; a rank that stops because another rank was signalled says so."""
        return signal.Signals(self.signum).name if self.signum is not None else "on another rank"


class Position:
    """Where a run is: the steps done, the epoch, and the next batch inside that epoch."""

    def __init__(self, steps_per_epoch: int, n_critic: int) -> None:
        self.steps_per_epoch, self.n_critic = steps_per_epoch, n_critic
        self.step = self.epoch = self.batch = 0

    def advance(self) -> None:
        self.step += 1
        self.batch += self.n_critic
        if self.batch >= self.steps_per_epoch * self.n_critic:
            self.epoch, self.batch = self.epoch + 1, 0


class Trainer:
    """Wires the components of one run and drives the loop; every rank runs the same calls."""

    def __init__(self, cfg: Config, env: DistEnv, stop: StopFlag) -> None:
        self.env, self.stop = env, stop
        self.run_dir = Path(cfg.run_dir)
        env.raise_together(_prepare_run_dir(self.run_dir) if env.is_main else None)
        split = load_split(cfg.data, env)
        self.info = split.info
        self.data = make_batches(split, cfg.data, env, cfg.train.batch_size, cfg.train.seed)
        self.engine = GANEngine(cfg, env, self.info)
        # From here on the config is the resolved one: what ``auto`` chose is what the run records.
        self.cfg = cfg = dataclasses.replace(cfg, amp=self.engine.precision.config)
        self.pos = Position(len(self.data) // cfg.train.n_critic, cfg.train.n_critic)
        if self.pos.steps_per_epoch == 0:
            raise DataError(f"{len(self.data)} batches per rank cannot feed train.n_critic={cfg.train.n_critic}")
        total = cfg.train.epochs * self.pos.steps_per_epoch
        self.total_steps = min(total, cfg.train.max_steps or total)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, env)
        self.best_fid = math.inf
        self.eval_seconds = 0.0
        self.last_saved: Path | None = None
        run_id = self._restore(self.checkpointer.resume_state(cfg.train.resume))
        self._say(f"data: {describe_data(self.info, split.name, self.engine.num_classes)}; {self.data}")
        self._say(f"precision: {cfg.amp.dtype} ({self.engine.precision.reason})")
        if env.is_main:  # only once the resume check has passed: a refused start changes nothing
            (self.run_dir / "config.yaml").write_text(
                f"# amp.dtype: {self.engine.precision.reason}\n" + to_yaml(cfg))
        self.evaluator = Evaluator(cfg, env) if cfg.eval.every_steps > 0 else None
        wandb_config = to_dict(cfg) | {"resolved": {"amp": self.engine.precision.reason,
                                                    "data": self.info.to_dict()}}
        wandb_run = start_wandb(cfg.log.wandb, self.run_dir, wandb_config, run_id) if env.is_main else None
        self.wandb_id = wandb_run.id if wandb_run is not None else run_id
        self.logger = MetricLogger(cfg.log, env, self.run_dir, wandb_run, cfg.train.batch_size)
        self.samples = SampleWriter(cfg.log, env, self.run_dir, cfg.model.z_dim, cfg.train.seed, self.logger,
                                    self.info, self.engine.num_classes)

    def _say(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def _restore(self, state: dict | None) -> str | None:
        """Load a checkpoint into the engine and the position; returns the saved W&B run id."""
        if state is None:
            return None
        path = Path(state["path"])
        check_data(path, DatasetInfo.from_dict(state["data"]), self.info)
        check_shapes(path, "generator", state["generator"], self.engine.generator)
        check_shapes(path, "discriminator", state["discriminator"], self.engine.discriminator)
        self.engine.load_state_dict(state)
        self.pos.step, self.pos.epoch, self.pos.batch = state["step"], state["epoch"], state["batch"]
        self.best_fid = state.get("best_fid", math.inf)
        self.last_saved = path
        note = ""
        if state["world_size"] != self.env.world_size:
            # Re-shard from the same point of the epoch, counted in samples seen; exactness is lost.
            seen = state["batch"] * state["world_size"] * self.cfg.train.batch_size
            per_step = self.env.world_size * self.cfg.train.batch_size * self.cfg.train.n_critic
            self.pos.batch = seen // per_step * self.cfg.train.n_critic
            if self.pos.batch >= self.pos.steps_per_epoch * self.cfg.train.n_critic:
                self.pos.epoch, self.pos.batch = self.pos.epoch + 1, 0
            note = (f"; world size {state['world_size']} -> {self.env.world_size}: data re-sharded, "
                    "the run is no longer bit-exact")
        where = f"step {self.pos.step} (epoch {self.pos.epoch}, batch {self.pos.batch})"
        self._say(f"resuming from {path} at {where}{note}")
        return state.get("wandb_run_id")

    def state(self) -> dict:
        return self.engine.state_dict() | {
            "format_version": FORMAT_VERSION,
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "batch": self.pos.batch,
            "world_size": self.env.world_size,
            "rng": {"seed": self.cfg.train.seed, "scheme": "blake2b(seed/rank/step/phase) reseeded every step"},
            "config": to_dict(self.cfg),
            "data": self.info.to_dict(),
            "wandb_run_id": self.wandb_id,
            "best_fid": self.best_fid,
        }

    def save(self, name: str | None = None) -> Path:
        """Every rank calls this at the same step; weights that are not finite are never written."""
        if self.env.any(not self.engine.finite()):
            raise Diverged(f"non-finite weights at step {self.pos.step}")
        path = self.checkpointer.save(self.state(), name=name)
        if name is None:
            self.last_saved = path
        self._say(f"saved {path}")
        return path

    def evaluate(self, train_seconds: float) -> None:
        """Score the sampling G on every rank; keep ``best.pt`` when FID improves."""
        scores = self.evaluator.run(self.engine.sampler)
        self.eval_seconds += scores["seconds"]
        scores["share_of_time"] = self.eval_seconds / max(train_seconds, 1e-9)
        self.logger.log_eval(self.pos.step, self.pos.epoch, scores)
        if scores["fid"] < self.best_fid:
            self.best_fid = scores["fid"]
            self._say(f"new best FID {self.best_fid:.3f}")
            self.save(name="best.pt")

    def fit(self) -> int:
        """Train to the last step, or until a stop signal (exit 75) or divergence (exit 3)."""
        cfg, pos = self.cfg, self.pos
        group = f" ({self.env.backend} process group)" if self.env.distributed else ""
        self._say(f"world size {self.env.world_size} on {self.env.device}{group}; global batch "
                  f"{cfg.train.batch_size * self.env.world_size}; {pos.steps_per_epoch} steps per epoch; "
                  f"training to step {self.total_steps}")
        if self.env.any(self.stop.signum is not None):
            self._say(f"stopped by signal ({self.stop.name}) before step {pos.step + 1}: nothing new to save; "
                      f"exit {EXIT_REQUEUE} to requeue")
            return EXIT_REQUEUE
        agreement = StepAgreement(self.env)
        try:
            code = self._loop(agreement)
        except Diverged as e:
            agreement.drain()
            kept = f"{self.last_saved} is the newest and last good checkpoint" if self.last_saved else \
                "no checkpoint was saved"
            self._say(f"training diverged: {e}; nothing non-finite was saved; {kept}; exit {EXIT_DIVERGED}")
            return EXIT_DIVERGED
        agreement.drain()
        return code

    def _loop(self, agreement: StepAgreement) -> int:
        cfg, pos = self.cfg, self.pos
        lrs = {"g": cfg.optim.g_lr, "d": cfg.optim.d_lr}
        progress = Progress(self.total_steps, enabled=self.env.is_main and cfg.log.progress)
        start = time.perf_counter()
        while pos.step < self.total_steps:
            epoch = pos.epoch
            batches = self.data.epoch(epoch, start=pos.batch)
            while pos.epoch == epoch and pos.step < self.total_steps:
                reals = [next(batches) for _ in range(cfg.train.n_critic)]
                metrics = self.engine.iteration(pos.step, reals)
                pos.advance()
                self.logger.update(pos.step, metrics)
                progress.update(pos.step)
                if self.logger.due(pos.step):
                    self.logger.flush(pos.step, pos.epoch, lrs)
                if self.samples.due(pos.step):
                    self.samples.write(pos.step, self.engine.sampler)
                if self.evaluator is not None and self.evaluator.due(pos.step):
                    self.evaluate(time.perf_counter() - start)
                stopping, timed = agreement.exchange(self.stop.signum is not None, self.checkpointer.time_due())
                if stopping or ((timed or self.checkpointer.due(pos.step)) and pos.step < self.total_steps):
                    self.save()
                if stopping:
                    self.logger.flush(pos.step, pos.epoch, lrs)
                    self._say(f"stopped by signal ({self.stop.name}) at step {pos.step}; "
                              f"exit {EXIT_REQUEUE} to requeue")
                    return EXIT_REQUEUE
            if pos.epoch != epoch and not self.samples.due(pos.step):
                self.samples.write(pos.step, self.engine.sampler)
        progress.close()
        self.logger.flush(pos.step, pos.epoch, lrs)
        if not self.samples.due(pos.step) and pos.batch != 0:
            self.samples.write(pos.step, self.engine.sampler)
        self.save()
        self._say(f"done: {pos.step} steps in {self.run_dir}")
        return 0

    def close(self) -> None:
        if self.logger.wandb is not None:
            self.logger.wandb.finish()


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


class Progress:
    """A one-line progress bar on a terminal; silent in logs and files."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.start, self.first = time.perf_counter(), None

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        self.first = self.first or step
        rate = (step - self.first + 1) / max(time.perf_counter() - self.start, 1e-9)
        width = 30
        done = width * step // self.total
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {rate:.1f} it/s")

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gan_dist.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override as key=value):\n" + "\n".join(describe()),
    )
    parser.add_argument("--config", help="YAML file layered over the defaults")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    stop = StopFlag()  # first of all: a signal during start-up is a clean stop, not a silent death
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    env = trainer = None
    reason = None
    try:
        env = setup(cfg.dist)
        trainer = Trainer(cfg, env, stop)
        return trainer.fit()
    except (ConfigError, DataError, CheckpointError) as e:
        reason = f"error (rank {env.rank if env else os.environ.get('RANK', 0)}): {e}"
        return EXIT_USAGE
    except PeerFailed as e:  # every rank is here: the ranks that failed say why before any rank exits
        if e.cause is not None:
            print(f"error (rank {env.rank}): {e.cause}", file=sys.stderr, flush=True)
        env.barrier()
        return EXIT_USAGE
    except KeyboardInterrupt:
        reason = "aborted by a second interrupt; every checkpoint on disk is complete"
        return EXIT_ABORTED
    finally:
        if trainer is not None:
            trainer.close()
        if env is not None:
            teardown(env)
        if reason:  # last, so it is the line right above a launcher's summary
            print(reason, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
