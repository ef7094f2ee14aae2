"""A training run inside a stage's process, and the comparison of two runs' tensors."""

import math
import time
from collections.abc import Iterator

import torch

from gan_dist.config import Config
from gan_dist.dist import DistEnv
from gan_dist.training.losses import LossStats
from gan_dist.training.position import Position, iterations
from gan_dist.training.trainer import build


class Run:
    """A run built as the trainer builds it (``gan_dist.training.trainer.build``) on the mode's device with its real
    data, stepped as ``Trainer.fit`` steps it."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.env = env
        built = build(cfg, env)
        self.cfg, self.info, self.shards, self.engine = built.cfg, built.info, built.data, built.engine
        self.pos = Position(built.steps_per_epoch, cfg.train.n_critic, cfg.train.batch_size, env.world_size)
        self.batches = iterations(self.shards, self.pos)

    @property
    def step(self) -> int:
        return self.pos.step

    def train(self, steps: int) -> list[LossStats]:
        """``steps`` iterations; their metrics, left on the device (reading them would sync)."""
        metrics = []
        for _ in range(steps):
            metrics.append(self.engine.iteration(self.pos.step, next(self.batches)))
            self.pos.advance()
        return metrics

    def timed(self, steps: int) -> tuple[list[LossStats], float]:
        """``train(steps)`` and its seconds, the device synchronised before and after."""
        sync = torch.cuda.synchronize if self.env.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        metrics = self.train(steps)
        sync()
        return metrics, time.perf_counter() - start

    def read(self, metrics: list[LossStats]) -> dict[str, torch.Tensor]:
        """Each metric an iteration reports (``engine.metric_names``), over the steps that reported it, on the
        host; one that no step reported (a lazy regularizer between its steps) is left out."""
        return {name: torch.stack([m[name] for m in metrics if name in m]).float().cpu()
                for name in self.engine.metric_names if any(name in m for m in metrics)}

    def finite(self, values: dict[str, torch.Tensor]) -> bool:
        """Whether the metrics ``read`` gave and every tensor of the run are finite."""
        return all(bool(torch.isfinite(v).all()) for v in values.values()) and \
            all(bool(torch.isfinite(t).all()) for _, t in self.tensors())

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter, buffer and optimizer state tensor the run keeps."""
        eng = self.engine
        modules = {"G": eng.generator, "D": eng.discriminator} | ({"EMA": eng.ema.module} if eng.ema else {})
        for tag, module in modules.items():
            yield from ((f"{tag}.{n}", t) for n, t in [*module.named_parameters(), *module.named_buffers()])
        for tag, opt in (("opt_g", eng.opt_g), ("opt_d", eng.opt_d)):
            for i, state in enumerate(opt.state.values()):
                yield from ((f"{tag}.{i}.{k}", t) for k, t in state.items() if torch.is_tensor(t))


def last_values(values: dict[str, torch.Tensor]) -> str:
    """The last value of each metric ``Run.read`` gave: a check's evidence."""
    return "last " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in values.items())


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest |a - b| per tensor: 0.0 when bitwise equal, inf when missing or of another shape or dtype."""
    out = {}
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
            out[key] = math.inf
        elif torch.equal(x, y):
            out[key] = 0.0
        else:
            out[key] = float((x.double() - y.double()).abs().max()) if x.numel() else math.inf
    return out
