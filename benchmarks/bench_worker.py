"""The measuring side of ``benchmarks/bench.py``: what one benchmark process (one rank of a case) trains,
how its steps are timed and split into phases, and the result it writes for the parent to read.
"""

# No ``from __future__ import annotations``: DDP checks a comm hook's annotations as live objects.
import argparse
import contextlib
import itertools
import json
import resource
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from benchmarks.plain import PlainLoop
from benchmarks.tutorial import (
    TutorialDataset,
    TutorialDiscriminator,
    TutorialGenerator,
    tutorial_discriminator_train_step,
    tutorial_generator_train_step,
    tutorial_misfit,
)
from gan_dist.config import Config, DataError
from gan_dist.configio import load_config
from gan_dist.data.cache import load_split
from gan_dist.dist import DistEnv, StepAgreement, setup, teardown, usable_cores
from gan_dist.evaluation.diversity import ZSpread
from gan_dist.training.losses import Networks
from gan_dist.training.position import Position, iterations
from gan_dist.training.trainer import build

PHASES = ("data", "fwd_bwd", "optim", "comm")
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}  # side of the square matmul timed as the FLOP/s ceiling, per device
ALONE_ON_CPU = DistEnv(0, 0, 1, 1, torch.device("cpu"))  # for reading data outside a process group


# ------------------------------------------------------------------------------------------------
# Workloads: what one benchmark process trains, behind one interface the timing loop drives.
# ------------------------------------------------------------------------------------------------


class PhaseClock:
    """Seconds per phase, summed while armed. ``sync`` runs at every boundary (a CUDA synchronize),
    which is why CUDA throughput is timed in a pass with the clock disarmed."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.armed = False
        self.totals: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()  # comm completions are reported from gloo's threads

    def reset(self, armed: bool) -> None:
        self.armed = armed
        self.totals.clear()

    def start(self, name: str) -> None:
        if self.armed:
            self.sync()
            self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        if self.armed:
            self.sync()
            self.add(name, time.perf_counter() - self._started.pop(name))

    def add(self, name: str, seconds: float) -> None:
        if self.armed:
            with self._lock:
                self.totals[name] += seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)


class AllReduceTimer:
    """State of the timed comm hook: the union of the intervals during which an all-reduce was in
    flight (buckets may overlap each other and the rest of backward; each second counts once)."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock
        self.last_end = 0.0
        self.lock = threading.Lock()

    def done(self, start: float) -> None:
        end = time.perf_counter()
        with self.lock:
            self.clock.add("comm", max(0.0, end - max(start, self.last_end)))
            self.last_end = max(self.last_end, end)


def timed_allreduce(state: AllReduceTimer, bucket: tdist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's averaging all-reduce (the default hook's arithmetic), timed from bucket ready to reduced."""
    start = time.perf_counter()

    def finish(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        state.done(start)
        return fut.value()

    return default_hooks.allreduce_hook(None, bucket).then(finish)


class Workload:
    """One process's share of a case: its batches, its training step and what to instrument."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: str = "float32"
    times_comm: bool = False
    clock: PhaseClock

    def optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def instrument(self, clock: PhaseClock) -> None:
        """Time every optimizer step; subclasses add their communication."""
        self.clock = clock
        for opt in self.optimizers():
            opt.register_step_pre_hook(lambda *_: clock.start("optim"))
            opt.register_step_post_hook(lambda *_: clock.stop("optim"))

    def next_batch(self) -> Any:
        raise NotImplementedError

    def train_step(self, step: int, batch: Any) -> int:
        """Train on ``batch``; returns the real images it consumed."""
        raise NotImplementedError

    def log_step_extra_ms(self) -> float | None:
        """What a log step adds on rank 0 beyond the metrics' all-reduce (None: nothing)."""
        return None

    def eager(self) -> contextlib.AbstractContextManager:
        """Steps inside run uncompiled: where FLOPs are counted (the default: the workload is never compiled)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Leave the process as found (process groups)."""


def _forever(epochs: Callable[[int], Iterable]) -> Iterator:
    """Batches across epoch boundaries: warm-up plus timed steps may outrun one epoch."""
    for epoch in itertools.count():
        yield from epochs(epoch)


class TutorialWorkload(Workload):
    """(a): the tutorial's models, optimizers and DataLoader, stepped by its two train-step functions."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            torch.set_num_threads(usable_cores())  # the threads dist.setup gives (b)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        split = load_split(cfg.data, ALONE_ON_CPU)
        misfit = tutorial_misfit(split.info)
        if misfit:
            raise DataError(misfit)
        images, labels = (torch.from_numpy(np.asarray(a)) for a in (split.images, split.labels))
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=(0.5,), std=(0.5,))])
        dataset = TutorialDataset(images, labels, transform)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True)
        self.batches = _forever(lambda _: loader)
        self.generator = TutorialGenerator().to(device)
        self.discriminator = TutorialDiscriminator().to(device)
        self.criterion = nn.BCELoss()
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=1e-4)
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=1e-4)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.d_optimizer, self.g_optimizer]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self.batches)
        return images.to(self.device), labels.to(self.device)

    def train_step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        real_images, labels = batch
        self.generator.train()
        batch_size = real_images.size(0)
        tutorial_discriminator_train_step(batch_size, self.discriminator, self.generator, self.d_optimizer,
                                          self.criterion, real_images, labels, self.device)
        tutorial_generator_train_step(batch_size, self.discriminator, self.generator, self.g_optimizer,
                                      self.criterion, self.device)
        return batch_size


class PlainWorkload(Workload):
    """(a) with ``--reference plain``: the config's networks in ``benchmarks/plain.py``'s hand-written loop."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            torch.set_num_threads(usable_cores())  # the threads dist.setup gives (b)
        split = load_split(cfg.data, ALONE_ON_CPU)
        images, labels = split.tensors(device)
        self.loop = PlainLoop(cfg, split.info, images, labels, device)
        self.precision = str(self.loop.dtype).removeprefix("torch.")

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.loop.opt_d, self.loop.opt_g]

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.loop.next_batch()

    def train_step(self, step: int, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        self.loop.step(batch)
        return sum(real.shape[0] for real, _ in batch)


class EngineWorkload(Workload):
    """(b) and (c): gan_dist's own components; a step is what ``Trainer.fit`` does per step on the
    hot path (``engine.iteration`` and the step agreement), minus the periodic logging."""

    def __init__(self, cfg: Config) -> None:
        self.env = setup(cfg.dist)
        self.device, self.rank, self.world_size = self.env.device, self.env.rank, self.env.world_size
        # gloo only: an NCCL future completes when the work is queued, not when it is done.
        self.times_comm = self.env.distributed and self.device.type == "cpu"
        built = build(cfg, self.env)
        self.shards, self.engine = built.data, built.engine
        self.z_spread = ZSpread(built.split, self.engine.label_classes, cfg.model.z_dim, cfg.train.seed, self.device,
                                cfg.log.z_spread_warn) if cfg.log.z_spread else None
        self.pos = Position(built.steps_per_epoch, cfg.train.n_critic, cfg.train.batch_size, self.world_size)
        self.batches = iterations(self.shards, self.pos)
        self.precision = built.cfg.amp.dtype  # what amp.dtype=auto resolved to
        self.agreement = StepAgreement(self.env)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.engine.opt_d, self.engine.opt_g]

    def instrument(self, clock: PhaseClock) -> None:
        super().instrument(clock)
        if self.times_comm:
            for module in (self.engine.nets.G.step, self.engine.nets.D.step):
                module = getattr(module, "_orig_mod", module)  # under train.compile, the DDP it compiled
                if isinstance(module, DDP):
                    module.register_comm_hook(AllReduceTimer(clock), timed_allreduce)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = next(self.batches)
        self.pos.advance()
        return batches

    def train_step(self, step: int, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        self.engine.iteration(step, batch)
        with self.clock.phase("comm") if self.times_comm else contextlib.nullcontext():
            self.agreement.exchange(False, False)
        return sum(real.shape[0] for real, _ in batch)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Under ``train.compile``, the engine's steps on its modules as built, without torch.compile (the same
        weights and DDP): FlopCounterMode counts those, never the compiled code, which it is reported to leave
        slow afterwards. CUDA graphs are not stepped meanwhile."""
        eng = self.engine
        nets, graphed = eng.nets, eng.graphed
        eng.nets, eng.graphed = Networks(nets.G.eager(), nets.D.eager()), False
        try:
            yield
        finally:
            eng.nets, eng.graphed = nets, graphed

    def log_step_extra_ms(self) -> float | None:
        """The z_spread measurement, the median of 5 (every rank runs it at every log step)."""
        if self.z_spread is None:
            return None
        sync, times = device_sync(self.device), []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            self.z_spread.measure(self.engine.generator)
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    def close(self) -> None:
        self.agreement.drain()
        teardown(self.env)


# ------------------------------------------------------------------------------------------------
# Measuring one process
# ------------------------------------------------------------------------------------------------


def device_sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, min_seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul: what this process reaches when compute, not overhead, bounds."""
    n = MATMUL_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = device_sync(device)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        a @ b
        sync()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def timed_pass(work: Workload, clock: PhaseClock, steps: int, counter: Iterator[int], split: bool
               ) -> tuple[float, int, dict[str, float]]:
    """Run ``steps`` steps; returns (seconds, images, seconds per phase when ``split``)."""
    clock.reset(armed=split)
    clock.sync()
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        with clock.phase("data"):
            batch = work.next_batch()
        images += work.train_step(next(counter), batch)
    clock.sync()
    return time.perf_counter() - start, images, dict(clock.totals)


def measure(work: Workload, steps: int, warmup: int) -> dict[str, Any]:
    """One counted step, ``warmup`` dropped steps, then the timed pass(es) of one process."""
    clock = PhaseClock(device_sync(work.device))
    work.instrument(clock)
    counter = itertools.count()
    start = time.perf_counter()  # the first step pays for lazy init and, under train.compile, compiling
    work.train_step(next(counter), work.next_batch())
    clock.sync()
    first_step_s = time.perf_counter() - start
    with work.eager(), FlopCounterMode(display=False) as flops:  # never on compiled code
        counted = work.train_step(next(counter), work.next_batch())
    for _ in range(warmup):
        work.train_step(next(counter), work.next_batch())
    ceiling = {name: matmul_ceiling(work.device, getattr(torch, name)) for name in {"float32", work.precision}}
    if work.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(work.device)
        seconds, images, _ = timed_pass(work, clock, steps, counter, split=False)
        split_s, _, phases = timed_pass(work, clock, steps, counter, split=True)
    else:  # syncs are free: one pass gives both
        seconds, images, phases = timed_pass(work, clock, steps, counter, split=True)
        split_s = seconds
    comm = phases.get("comm", 0.0) if work.times_comm else None
    other = sum(phases.get(p, 0.0) for p in ("data", "optim")) + (comm or 0.0)
    per_step = {"data": phases.get("data", 0.0), "fwd_bwd": split_s - other,
                "optim": phases.get("optim", 0.0), "comm": comm}
    return {
        "rank": work.rank,
        "world_size": work.world_size,
        "threads": torch.get_num_threads() if work.device.type == "cpu" else None,
        "device": str(work.device),
        "precision": work.precision,
        "steps": steps,
        "first_step_s": first_step_s,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "step_ms": 1e3 * seconds / steps,
        "phases_ms": {k: None if v is None else 1e3 * v / steps for k, v in per_step.items()},
        "flops_per_image": flops.get_total_flops() / counted,
        "matmul_ceiling_flop_per_s": ceiling,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(work.device) / 2**20
        if work.device.type == "cuda" else None,
        "z_spread_ms": work.log_step_extra_ms(),
    }


def worker_config(args: argparse.Namespace) -> Config:
    """The config a case reads: file, overrides (a twin's come last), then the bench's batch and device."""
    return load_config(args.config, [*args.overrides, f"train.batch_size={args.batch}", f"dist.device={args.device}"])


def run_worker(args: argparse.Namespace) -> int:
    """One benchmark process (or one rank of one): measure, then write ``<out>/rank<R>.json``."""
    cfg = worker_config(args)
    device = torch.device(args.device)
    work = {"ref": lambda: TutorialWorkload(cfg, device), "plain": lambda: PlainWorkload(cfg, device),
            "gan": lambda: EngineWorkload(cfg)}[args.worker]()
    try:
        result = measure(work, args.steps, args.warmup)
    finally:
        work.close()
    Path(args.out, f"rank{result['rank']}.json").write_text(json.dumps(result))
    return 0
