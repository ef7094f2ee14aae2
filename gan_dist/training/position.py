"""Where a run is, and the components that act at its steps.

The loop advances a ``Position`` and, after every step, runs each ``Component`` that says it is due:
the metric logger, the sample writer, the evaluation and the checkpointer each decide their own
cadence from the position and the ranks' agreed flags, and save and load their own state where they have
one. Each is built the one way, ``build(section, context)``: its config section, and a ``Context`` of what it
may use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from gan_dist.checkpoint import Stateful
    from gan_dist.data.batches import ShardedBatches
    from gan_dist.data.cache import Split
    from gan_dist.dist import Agreed, DistEnv
    from gan_dist.evaluation.evaluator import Evaluator
    from gan_dist.training.engine import GANEngine
    from gan_dist.training.monitor import MetricLogger


class Position:
    """Where a run is: the steps done, the epoch, and the next batch of this rank inside that epoch."""

    def __init__(self, steps_per_epoch: int, n_critic: int, batch_size: int, world_size: int) -> None:
        self.steps_per_epoch, self.n_critic = steps_per_epoch, n_critic
        self.batch_size, self.world_size = batch_size, world_size
        self.step = self.epoch = self.batch = 0
        self.resharded: str | None = None
        """How the checkpoint's world size or batch differed from this run's (then re-positioned), if they did."""

    @property
    def epoch_ended(self) -> bool:
        """The step just taken finished an epoch (the next batch is an epoch's first)."""
        return self.batch == 0

    def advance(self) -> None:
        self.step += 1
        self.batch += self.n_critic
        self._roll()

    def _roll(self) -> None:
        if self.batch >= self.steps_per_epoch * self.n_critic:
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Another world size or batch re-positions at the same point of the epoch, counted in samples seen, to
        the step boundary at or before it; the run is then no longer bit-exact."""
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        changes = [f"{what} {state[key]} -> {mine}" for what, key, mine in (
            ("world size", "world_size", self.world_size), ("train.batch_size", "batch_size", self.batch_size))
            if state[key] != mine]
        if changes:
            seen = state["batch"] * state["world_size"] * state["batch_size"]
            self.batch = seen // (self.world_size * self.batch_size * self.n_critic) * self.n_critic
            self.resharded = ", ".join(changes)
        self._roll()  # data that shrank since the save can end the epoch before the saved batch

    def __str__(self) -> str:
        return f"step {self.step} (epoch {self.epoch}, batch {self.batch})"


def iterations(data: ShardedBatches, pos: Position,
               total_steps: int | None = None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """What each iteration from ``pos`` on uses, to ``total_steps`` (None: without end): ``pos.n_critic`` batches,
    one per D step. The caller advances ``pos`` once it has taken them; an epoch ends where ``pos`` says."""
    while total_steps is None or pos.step < total_steps:
        epoch = pos.epoch
        batches = data.epoch(epoch, start=pos.batch)
        while pos.epoch == epoch and (total_steps is None or pos.step < total_steps):
            yield [next(batches) for _ in range(pos.n_critic)]


@dataclass(frozen=True)
class Context:
    """What a component may use when it is built: the ranks, the run's folder, the split and the engine it trains
    (the sampler, the label classes, the metrics), the run's seed and latent size, the states a checkpoint holds,
    and the services of components built before it: the logger (``sink``) and the checkpointer's ``save``."""

    env: DistEnv
    run_dir: Path
    split: Split
    engine: GANEngine
    seed: int
    z_dim: int
    batch_per_rank: int
    states: Mapping[str, Stateful]
    evaluator: Callable[[], Evaluator]
    """Builds the scorer of ``eval.every_steps`` (the entry point injects evaluation's judge and Inception)."""
    sink: MetricLogger | None = None
    save: Callable[..., Path] | None = None


class Component:
    """What the loop runs after a step when it says it is due. Every rank asks and runs at the same
    steps (most components enter collectives), so ``due`` must answer alike on every rank: it reads only the
    position and the flags the ranks agreed."""

    final = False
    """It also runs after the last step, unless it was due there (the last record, grid and checkpoint)."""

    def due(self, pos: Position, agreed: Agreed) -> bool:
        raise NotImplementedError

    def run(self, pos: Position) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what it holds (a W&B run) when the run ends, however it ends; most hold nothing."""
