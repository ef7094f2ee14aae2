"""What a run shows: metrics on the console, in ``metrics.jsonl`` and W&B, and its progress.

The metrics are whatever the loss names (``GANLoss.names``). All ranks call in at the same steps
(the metric all-reduce is a collective); only global rank 0 touches files, the terminal or W&B.
W&B is optional at run time: if it cannot start, training goes on.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from gan_dist.amp import SKIPPED
from gan_dist.config import Diverged, LogConfig, WandbConfig, WriteError
from gan_dist.evaluation.diversity import ZSpread
from gan_dist.training.position import Component, Context, Position

if TYPE_CHECKING:
    from gan_dist.dist import Agreed, DistEnv

NEVER = 2**62  # "no non-finite value yet", as a first-bad step


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


class MetricLogger(Component):
    """Accumulates the named step metrics on the device and reduces them over ranks every ``log.every_steps``,
    and owns the run's W&B run (rank 0): it opens it, logs to it and finishes it.

    A metric that a step does not report (a lazy regularizer's) is averaged over the steps that do.
    After a resume, steps up to the last one already logged are written again to ``metrics.jsonl``
    with ``"replayed": true`` (the newest record of a step wins) and are not sent to W&B, whose
    step axis must only rise. ``learning_rates`` go to W&B beside each record; each of ``probes`` adds its
    measurements at the logged step (``z_spread``, the ramps' values) to the record.
    """

    final = True

    def __init__(self, cfg: LogConfig, env: DistEnv, run_dir: Path, batch_per_rank: int, names: Sequence[str],
                 learning_rates: Callable[[], dict[str, float]],
                 probes: Sequence[Callable[[int], dict[str, float]]] = ()) -> None:
        self.cfg, self.env, self.names = cfg, env, tuple(names)
        self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
        self.learning_rates, self.probes = learning_rates, probes
        self.wandb = None
        self.newest: tuple[Path, int] | None = None
        """log_model=last: the newest checkpoint this process saved, logged when it closes."""
        self.replay_until = last_logged_step(self.path) if env.is_main else 0
        self.batch = batch_per_rank
        n, device = len(self.names), env.device
        self.sums, self.counts, self.bad = (torch.zeros(n, device=device) for _ in range(3))
        self.first_bad = torch.full((n,), NEVER, dtype=torch.int64, device=device)
        self.masks: dict[frozenset[str], torch.Tensor] = {}
        self._skip_slot = torch.tensor([n == SKIPPED for n in self.names], device=device)
        self.steps = 0
        self.window_start = time.perf_counter()

    @classmethod
    def build(cls, cfg: LogConfig, ctx: Context) -> MetricLogger:
        engine, probes = ctx.engine, []
        if cfg.z_spread:  # every rank measures (the same latents and weights): G's SyncBatchNorm is a collective
            spread = ZSpread(ctx.split, engine.label_classes, ctx.z_dim, ctx.seed, ctx.env.device, cfg.z_spread_warn)
            probes.append(lambda step: spread.record(engine.generator, ctx.env.is_main))
        if engine.ramps.ramps:
            probes.append(lambda step: engine.ramps.at(step - 1))
        return cls(cfg, ctx.env, ctx.run_dir, ctx.batch_per_rank, engine.metric_names, lambda: engine.learning_rates,
                   probes)

    def open_wandb(self, config: dict[str, Any], run_id: str | None) -> str | None:
        """Rank 0 opens the W&B run (or reopens it, by the id a checkpoint kept); returns its id."""
        if self.env.is_main:
            self.wandb = start_wandb(self.cfg.wandb, self.run_dir, config, run_id)
        return self.wandb.id if self.wandb is not None else run_id

    def checkpoint_saved(self, path: Path, step: int) -> None:
        """Rank 0, after each save: the file as a W&B model artifact, as ``log.wandb.log_model`` asks."""
        policy = self.cfg.wandb.log_model
        if self.wandb is None or policy == "none":
            return
        if path.name == "best.pt":
            if policy in ("best", "all"):
                self._log_model(path, step, ["best"])
        elif policy == "all":
            self._log_model(path, step, ["latest", f"step-{step}"])
        elif policy == "last":
            self.newest = path, step

    def _log_model(self, path: Path, step: int, aliases: list[str]) -> None:
        """One version of the run's model artifact (W&B copies the file: pruning cannot take it away)."""
        try:
            import wandb

            artifact = wandb.Artifact(f"model-{self.wandb.id}", type="model", metadata={"step": step,
                                                                                          "file": path.name})
            artifact.add_file(str(path), name=path.name)
            self.wandb.log_artifact(artifact, aliases=aliases)
        except Exception as e:  # as W&B's start: never fatal
            print(f"warning: W&B did not take {path} as an artifact ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160]})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.newest is not None:
            self._log_model(*self.newest, ["latest", f"step-{self.newest[1]}"])
            self.newest = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def _mask(self, reported: frozenset[str]) -> torch.Tensor:
        """Which of ``names`` a step reported, made once per pattern and kept on the device."""
        if reported not in self.masks:
            if not reported <= set(self.names):
                raise KeyError(f"metrics {sorted(reported - set(self.names))} are not among {self.names}")
            self.masks[reported] = torch.tensor([n in reported for n in self.names], device=self.sums.device)
        return self.masks[reported]

    def update(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Accumulate on the device: non-finite values are counted (and their first step kept), not summed. A step
        float16's loss scaler skipped counts as such (``amp_skipped``), and its other metrics not at all."""
        present = self._mask(frozenset(metrics))
        zero = self.sums.new_zeros(())
        values = torch.stack([metrics.get(n, zero).float() for n in self.names])
        if SKIPPED in metrics:
            present = present & ((metrics[SKIPPED] == 0) | self._skip_slot)
        bad = ~torch.isfinite(values) & present
        self.sums += values.masked_fill(bad | ~present, 0.0)
        self.counts += present
        self.bad += bad
        self.first_bad.masked_fill_(bad & (self.first_bad == NEVER), step)
        self.steps += 1

    def due(self, pos: Position, agreed: Agreed) -> bool:
        return pos.step % self.cfg.every_steps == 0

    def run(self, pos: Position) -> None:
        """Every rank calls this at the same step: the probe, then one all-reduce of the sums, counts and
        the images/s; rank 0 writes the window's means, with the probe's measurements beside them."""
        if not self.steps:
            return
        local = {k: v for probe in self.probes for k, v in probe(pos.step).items()}
        n = len(self.names)
        elapsed = time.perf_counter() - self.window_start
        rate = torch.tensor([self.steps * self.batch / elapsed], device=self.sums.device)
        total = self.env.all_reduce_sum(torch.cat([self.sums, self.counts, rate, self.bad])).tolist()
        sums, counts, images_per_s = total[:n], total[n:2 * n], total[2 * n]  # the one host sync of the window
        if any(total[2 * n + 1:]):  # the same sum on every rank, so all ranks stop here together
            first = self.env.all_reduce_min(self.first_bad.clone()).tolist()
            bad = {name: at for name, at in zip(self.names, first, strict=True) if at != NEVER}
            raise Diverged(f"non-finite {', '.join(bad)} from step {min(bad.values())} "
                           f"(found at the log step {pos.step})")
        record: dict[str, Any] = {"step": pos.step, "epoch": pos.epoch}
        record |= {k: total_k / count for k, total_k, count in zip(self.names, sums, counts, strict=True) if count}
        if SKIPPED in record:  # a count of steps, not a mean; a window of nothing but skips is no training at all
            steps = counts[self.names.index(SKIPPED)]
            record[SKIPPED] = round(sums[self.names.index(SKIPPED)])
            if record[SKIPPED] == steps:
                raise Diverged(f"float16's loss scaler skipped all {round(steps)} steps up to the log step {pos.step}: "
                               "the gradients are not finite at any scale")
        record["images_per_s"] = images_per_s
        record |= local
        for t in (self.sums, self.counts):
            t.zero_()
        self.steps = 0
        self.window_start = time.perf_counter()
        self.env.raise_together(self._write(record, self.learning_rates()) if self.env.is_main else None)

    def _append(self, record: dict[str, Any]) -> bool:
        """One JSON line; returns whether the step is a replay (then W&B must not see it)."""
        replayed = record["step"] <= self.replay_until
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record | ({"replayed": True} if replayed else {})) + "\n")
        except OSError as e:
            raise WriteError(self.path, e) from None
        return replayed

    def log_eval(self, step: int, epoch: int, scores: dict[str, float]) -> None:
        """Evaluation scores (already equal on every rank) as ``eval/*`` keys; rank 0 writes them."""
        with self.env.together(WriteError):
            if self.env.is_main:
                record = {"step": step, "epoch": epoch} | {f"eval/{k}": v for k, v in scores.items()}
                replayed = self._append(record)
                print(f"eval  {step:>7} | " + " ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
                if self.wandb is not None and not replayed:
                    self.wandb.log({k: v for k, v in record.items() if k.startswith("eval/")}, step=step)

    def _write(self, record: dict[str, Any], lrs: dict[str, float]) -> WriteError | None:
        """Rank 0's record of a log step; a failed write is returned, for every rank to raise together."""
        try:
            replayed = self._append(record)
        except WriteError as e:
            return e
        shown = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "epoch", "images_per_s"))
        print(f"step {record['step']:>7} epoch {record['epoch']:>3} | {shown} | "
              f"{record['images_per_s']:.0f} img/s" + (" (replayed)" if replayed else ""), flush=True)
        if self.wandb is not None and not replayed:
            extra = {f"lr/{k}": v for k, v in lrs.items()}
            if self.env.device.type == "cuda":
                extra["gpu/max_allocated_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
            train = {f"train/{k}": v for k, v in record.items() if k != "step"}
            self.wandb.log(train | extra, step=record["step"])
        return None

    def log_image(self, step: int, key: str, path: Path, caption: str) -> None:
        if self.wandb is not None and step > self.replay_until:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)


class Progress:
    """Rank 0's progress: a tqdm bar (steps, images/s, ETA) on a terminal; where stderr is not one
    (a Slurm log), a plain line every ``log.progress_seconds``, so a user tailing the log sees the ETA."""

    def __init__(self, cfg: LogConfig, env: DistEnv, total: int, done: int, images_per_step: int) -> None:
        self.enabled = cfg.progress and env.is_main
        self.total, self.images_per_step, self.every = total, images_per_step, cfg.progress_seconds
        self.start_step, self.start = done, time.monotonic()
        self.last_line = self.start
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, smoothing=0.05,
                        file=sys.stderr) if self.enabled and sys.stderr.isatty() else None

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"{self._rate(step) * self.images_per_step:.0f} img/s", refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            print(self.line(step), file=sys.stderr, flush=True)

    def _rate(self, step: int) -> float:
        """Steps per second since this process started training."""
        return (step - self.start_step) / max(time.monotonic() - self.start, 1e-9)

    def line(self, step: int) -> str:
        """``progress: step 1200/4680 (25.6%), 512 img/s, ETA 0:06:12``."""
        rate = self._rate(step)
        eta = datetime.timedelta(seconds=round((self.total - step) / rate)) if rate > 0 else "?"
        return (f"progress: step {step}/{self.total} ({100 * step / self.total:.1f}%), "
                f"{rate * self.images_per_step:.0f} img/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
