"""Benchmark gan_dist against the tutorial's training loop: images/s, step-time split, memory, FLOP/s.

Usage (from the repository root; trailing key=value are config overrides, as for gan_dist.train;
``python -m benchmarks.bench`` is the same command):
    python benchmarks/bench.py data.name=fashion_mnist data.root=/usr/share/datasets/fashion-mnist
    python benchmarks/bench.py --steps 300 --warmup 30 --rounds 5 --nproc 2 --batch 64 --json runs/bench.json
    python benchmarks/bench.py --compare amp.enabled=false     # also time (b) and (c) with this override
    python benchmarks/bench.py --compare-env OMP_WAIT_POLICY=PASSIVE --load 2   # a twin with this variable,
                                                                # all cases beside 2 busy processes
    python benchmarks/bench.py --device cuda --nproc 1 --batch 4096     # one GPU: (a) and (b) only

    python benchmarks/bench.py --config configs/folder_small.yaml --reference plain data.root=/data/emoji

Cases, each in a fresh process (so that peak memory is its own), alternating A B C A B C for --rounds:
  (a) reference, one of two (``--reference``; auto: tutorial for the tutorial's MLP on data it fits, else plain):
      tutorial: the tutorial's loop as written (``benchmarks/tutorial.py``), fixed only so that G learns.
        It keeps the tutorial's models, BCELoss and Adam(lr=1e-4) whatever the config says.
      plain: the config's own G and D trained by a hand-written PyTorch loop at the same precision
        (``benchmarks/plain.py``): no DDP, checkpoints or logging. Its bar is like for like.
      Either shares the data, the batch and the thread count with (b).
  (b) gan_dist on one process: dist.setup, then ``gan_dist.trainer.build`` (config -> env -> data -> engine),
      the trainer's own wiring (``--compare data.resident=off`` times streamed batches beside resident ones).
  (c) gan_dist on --nproc ranks under torchrun, the same batch per rank (skipped when --nproc is 1).
Every process runs one step under a FLOP counter, drops --warmup steps, then times --steps. A step is
split into data, forward/backward (the rest), optimizer (hooks on Adam.step) and communication (a DDP
comm hook timing each bucket's all-reduce, plus the loop's per-step stop-flag agreement; gloo only).
On CUDA the split comes from a second, synchronised pass and images/s from a pass without syncs.
Each process also times a large matmul right before its timed steps, with its own threads and beside
its peer ranks: that ceiling shares the case's layout and the machine's load of the moment.
Ratios are taken per round, between cases run side by side, and their median is reported, so a noisy
machine moves both sides of a ratio together.
Exit status: 0 done (targets are reported, not enforced); 1 a case failed; 2 bad arguments, config or data.
"""

# No ``from __future__ import annotations``: DDP checks a comm hook's annotations as live objects.
import sys
from pathlib import Path

# Run by path (python benchmarks/bench.py), Python puts benchmarks/ on sys.path, not the repository root:
# putting the root first makes ``benchmarks.tutorial`` (and this checkout's gan_dist) import either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
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

from benchmarks.plain import PlainLoop, plain_misfit
from benchmarks.tutorial import (
    TutorialDataset,
    TutorialDiscriminator,
    TutorialGenerator,
    tutorial_discriminator_train_step,
    tutorial_generator_train_step,
    tutorial_misfit,
)
from gan_dist import cli
from gan_dist.amp import native_bf16
from gan_dist.config import Config, DataError, DatasetInfo
from gan_dist.configio import load_config
from gan_dist.data import load_split
from gan_dist.dist import DistEnv, StepAgreement, setup, teardown, usable_cores
from gan_dist.diversity import ZSpread
from gan_dist.models import build_models
from gan_dist.trainer import build

REPO = Path(__file__).resolve().parents[1]
PROG = "python benchmarks/bench.py"
SCRIPT = Path(__file__).resolve()
"""What the workers run: this file by path, whichever way the parent was started and from any folder."""
DEFAULT_CONFIG = REPO / "configs" / "mnist_cgan.yaml"
EXIT_FAILED = 1
PHASES = ("data", "fwd_bwd", "optim", "comm")
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}  # side of the square matmul timed as the FLOP/s ceiling, per device
ALONE_ON_CPU = DistEnv(0, 0, 1, 1, torch.device("cpu"))  # for reading data outside a process group
# (numerator, denominator, bar) per device: medians of per-round images/s ratios. The bars are the
# documented targets; docs/BENCHMARKS.md says what each means. They are reported, never enforced.
TARGETS = {"tutorial": {"cpu": [("b", "a", 1.6), ("c", "b", 0.95)], "cuda": [("b", "a", 30.0)]},
           "plain": {"cpu": [("b", "a", 0.95), ("c", "b", 0.95)], "cuda": [("b", "a", 0.95)]}}


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
        self.z_spread = ZSpread(built.split, self.engine.num_classes, cfg.model.z_dim, cfg.train.seed, self.device,
                                cfg.log.z_spread_warn) if cfg.log.z_spread else None
        self.batches = _forever(self.shards.epoch)
        self.n_critic = cfg.train.n_critic
        self.precision = built.cfg.amp.dtype  # what amp.dtype=auto resolved to
        self.agreement = StepAgreement(self.env)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.engine.opt_d, self.engine.opt_g]

    def instrument(self, clock: PhaseClock) -> None:
        super().instrument(clock)
        if self.times_comm:
            for module in (self.engine.nets.G, self.engine.nets.D):
                module = getattr(module, "_orig_mod", module)  # under train.compile, the DDP it compiled
                if isinstance(module, DDP):
                    module.register_comm_hook(AllReduceTimer(clock), timed_allreduce)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [next(self.batches) for _ in range(self.n_critic)]

    def train_step(self, step: int, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        self.engine.iteration(step, batch)
        with self.clock.phase("comm") if self.times_comm else contextlib.nullcontext():
            self.agreement.exchange(False, False)
        return sum(real.shape[0] for real, _ in batch)

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
    with FlopCounterMode(display=False) as flops:
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


# ------------------------------------------------------------------------------------------------
# The parent: cases in rounds, then the table
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str  # a, b, c, then b', c' for the --compare twins
    label: str
    kind: str  # "ref" (the tutorial), "plain" or "gan"
    nproc: int
    overrides: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # NAME=VALUE for the case's processes


def worker_config(args: argparse.Namespace) -> Config:
    """The config a case reads: file, overrides (a twin's come last), then the bench's batch and device."""
    return load_config(args.config, [*args.overrides, f"train.batch_size={args.batch}", f"dist.device={args.device}"])


def compare_tag(compare_env: Sequence[str], compare: Sequence[str]) -> str:
    """What sets the twins apart, as their labels show it."""
    return " ".join([*compare_env, *compare])


def reference_of(args: argparse.Namespace, cfg: Config, info: DatasetInfo) -> str:
    """``--reference``, with auto resolved: the tutorial's loop for its own MLP on data it takes, else plain."""
    if args.reference != "auto":
        return args.reference
    return "tutorial" if cfg.model.arch == "mlp" and not tutorial_misfit(info) else "plain"


def reference_misfit(reference: str, cfg: Config, info: DatasetInfo) -> str | None:
    """Why the reference (a) cannot run on this config and data, or None."""
    return plain_misfit(cfg) if reference == "plain" else tutorial_misfit(info)


def plan(args: argparse.Namespace, cfg: Config, info: DatasetInfo) -> list[Case]:
    """(a) when the reference can run, (b), (c) with --nproc > 1, then the twins."""
    reference = reference_of(args, cfg, info)
    kind, label = ("plain", "plain PyTorch loop") if reference == "plain" else ("ref", "tutorial loop")
    cases = [] if reference_misfit(reference, cfg, info) else [Case("a", f"(a) reference: {label}", kind, 1)]
    cases.append(Case("b", "(b) gan_dist, 1 process", "gan", 1))
    if args.nproc > 1:
        cases.append(Case("c", f"(c) gan_dist, {args.nproc} ranks", "gan", args.nproc))
    if args.compare or args.compare_env:
        tag = compare_tag(args.compare_env, args.compare)
        cases += [Case(f"{c.key}'", f"{c.label} [{tag}]", "gan", c.nproc, tuple(args.compare),
                       tuple(args.compare_env)) for c in cases if c.kind == "gan"]
    return cases


class CaseFailed(RuntimeError):
    """A worker exited non-zero or wrote no result."""


def worker_argv(args: argparse.Namespace, case: Case, out: Path) -> list[str]:
    shared = ["--config", str(args.config), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--device", args.device]
    worker = [str(SCRIPT), "--worker", case.kind, "--out", str(out), *shared, *args.overrides, *case.overrides]
    if case.nproc == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.nproc}",
            *worker]


def launch(args: argparse.Namespace, case: Case) -> list[dict[str, Any]]:
    """Run one case in fresh process(es); returns the per-rank results, in rank order."""
    with tempfile.TemporaryDirectory(prefix="gan_dist_bench_") as out:
        env = os.environ | dict(item.split("=", 1) for item in case.env)
        proc = subprocess.run(worker_argv(args, case, Path(out)), capture_output=True, text=True, env=env)
        files = sorted(Path(out).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        if proc.returncode != 0 or len(files) != case.nproc:
            tail = (proc.stdout + proc.stderr)[-4000:]
            got = f"exit {proc.returncode}, {len(files)}/{case.nproc} results"
            raise CaseFailed(f"{case.label}: {got}\n{tail}")
        return [json.loads(f.read_text()) for f in files]


def model_flops(cfg: Config, info: DatasetInfo) -> dict[str, float]:
    """Forward FLOPs per image of G and D (the tutorial's pair has the same matmuls)."""
    g, d = build_models(cfg.model, info)
    z, y = torch.randn(2, cfg.model.z_dim), torch.zeros(2, dtype=torch.long)
    out = {}
    for name, run in (("G_forward", lambda: g(z, y)), ("D_forward", lambda: d(torch.zeros(2, *info.shape), y))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        out[name] = counter.get_total_flops() / 2
    return out


def global_images_per_s(rounds: list[list[dict[str, Any]]]) -> list[float]:
    """Per round, the sum over ranks: ranks step in lockstep, so this is the job's throughput."""
    return [sum(r["images_per_s"] for r in ranks) for ranks in rounds]


def _median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def summarise(case: Case, rounds: list[list[dict[str, Any]]],
              ref: list[list[dict[str, Any]]] | None) -> dict[str, Any]:
    """Medians over rounds of the per-round, all-rank figures; ratio to (a), when it ran, within each round."""
    global_ips = global_images_per_s(rounds)
    ratios = [g / a for g, a in zip(global_ips, global_images_per_s(ref), strict=True)] if ref else []
    first = rounds[0][0]
    ips = statistics.median(global_ips)
    achieved = first["flops_per_image"] * ips
    # The job's ceiling: its ranks' matmuls side by side, in the dtype the case computes in.
    ceiling = statistics.median(sum(r["matmul_ceiling_flop_per_s"][first["precision"]] for r in ranks)
                                for ranks in rounds)
    cuda_mb = _median(max(r["cuda_max_allocated_mb"] or 0 for r in ranks) for ranks in rounds)
    return {
        "ranks": case.nproc,
        "threads_per_rank": first["threads"],
        "precision": first["precision"],
        "first_step_s": statistics.median(max(r["first_step_s"] for r in ranks) for ranks in rounds),
        "images_per_s": ips,
        "images_per_s_per_rank": ips / case.nproc,
        "images_per_s_rounds": global_ips,
        "x_ref": _median(ratios),
        "x_ref_rounds": ratios,
        "step_ms": statistics.median(max(r["step_ms"] for r in ranks) for ranks in rounds),
        "phases_ms": {p: _median(statistics.fmean(r["phases_ms"][p] for r in ranks)
                                 if ranks[0]["phases_ms"][p] is not None else None for ranks in rounds)
                      for p in PHASES},
        "flops_per_image": first["flops_per_image"],
        "gflop_per_s": achieved / 1e9,
        "ceiling_gflop_per_s": ceiling / 1e9,
        "pct_of_ceiling": 100 * achieved / ceiling,
        "peak_rss_mb_per_rank": max(max(r["peak_rss_mb"] for r in ranks) for ranks in rounds),
        "z_spread_ms": _median(ranks[0].get("z_spread_ms") for ranks in rounds),
        "cuda_max_allocated_mb_per_rank": cuda_mb if first["device"].startswith("cuda") else None,
    }


def ratio(results: dict[str, list[list[dict[str, Any]]]], num: str, den: str) -> float:
    """The median over rounds of (num)'s global images/s over (den)'s, both taken in the same round."""
    pairs = zip(global_images_per_s(results[num]), global_images_per_s(results[den]), strict=True)
    return statistics.median(n / d for n, d in pairs)


def check_targets(reference: str, device: str, results: dict[str, list[list[dict[str, Any]]]]
                  ) -> list[dict[str, Any]]:
    """The bars of TARGETS between the cases that ran."""
    return [{"ratio": f"({num}) / ({den})", "value": value, "target": bar, "met": value >= bar}
            for num, den, bar in TARGETS[reference][device] if num in results and den in results
            for value in [ratio(results, num, den)]]


def twin_ratios(cases: Sequence[Case], results: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each --compare twin against its own case: what the override is worth, side by side."""
    return [{"ratio": f"({c.key}) / ({c.key[:-1]})", "value": ratio(results, c.key, c.key[:-1])}
            for c in cases if c.key.endswith("'")]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    """The table and the lines around it, as printed and as pasted into docs/BENCHMARKS.md."""
    m, s = report["machine"], report["settings"]
    label = max(46, *(len(c["label"]) for c in report["cases"]))
    lines = [
        f"$ {report['command']}",
        f"{m['device_name']} ({m['capability']}), {m['cores']} cores, torch {m['torch']}; "
        f"load average {m['load_before']} -> {m['load_after']}",
        f"batch {s['batch']} per rank, {s['steps']} timed steps after {s['warmup']} warm-up, "
        f"{s['rounds']} rounds (A B C ...); data {s['data']}"
        + (f"; beside {s['background_load']} busy processes" if s["background_load"] else ""),
        "",
        f"{'case':<{label}} {'ranks×thr':>9} {'dtype':>8} {'img/s':>8} {'/rank':>8} {'×(a)':>6} {'1st s':>6} "
        f"{'step ms':>8} {'data':>6} {'fwd/bwd':>7} {'optim':>6} {'comm':>6} {'GFLOP/s':>8} {'%ceil':>6} "
        f"{'RSS MB':>7} {'CUDA MB':>8}",
    ]
    for case in report["cases"]:
        r, ph = case["summary"], case["summary"]["phases_ms"]
        layout = f"{r['ranks']}×{'gpu' if r['threads_per_rank'] is None else r['threads_per_rank']}"
        lines.append(
            f"{case['label']:<{label}} {layout:>9} {r['precision']:>8} {r['images_per_s']:>8.0f} "
            f"{r['images_per_s_per_rank']:>8.0f} {_fmt(r['x_ref'], '6.2f'):>6} {r['first_step_s']:>6.1f} "
            f"{r['step_ms']:>8.2f} "
            f"{_fmt(ph['data'], '6.2f'):>6} {_fmt(ph['fwd_bwd'], '7.2f'):>7} {_fmt(ph['optim'], '6.2f'):>6} "
            f"{_fmt(ph['comm'], '6.2f'):>6} "
            f"{r['gflop_per_s']:>8.1f} {r['pct_of_ceiling']:>6.1f} {r['peak_rss_mb_per_rank']:>7.0f} "
            f"{_fmt(r['cuda_max_allocated_mb_per_rank'], '8.0f'):>8}")
    flops = report["model_flops_per_image"]
    per_case = ", ".join(f"({c['key']}) {c['summary']['flops_per_image'] / 1e6:.1f}" for c in report["cases"])
    lines += [
        "",
        f"FLOPs per image: G forward {flops['G_forward'] / 1e6:.2f} M, D forward "
        f"{flops['D_forward'] / 1e6:.2f} M; one training step (matmuls, fwd+bwd): {per_case} M",
        f"%ceil: against a {report['settings']['matmul_size']}² matmul in the case's dtype, timed in each rank "
        "before its steps: " + ", ".join(f"({c['key']}) {c['summary']['ceiling_gflop_per_s']:.0f}"
                                         for c in report["cases"]) + " GFLOP/s",
        "1st s: the first step (lazy init; under train.compile, compiling); step ms split per rank: data | "
        "fwd/bwd (the rest) | optim (Adam.step) | comm (all-reduce in flight + step agreement; gloo only)",
    ]
    lines += [f"z_spread (each log step) in {c['key']}: {c['summary']['z_spread_ms']:.1f} ms = "
              f"{c['summary']['z_spread_ms'] / c['summary']['step_ms']:.2f} steps"
              for c in report["cases"] if c["summary"].get("z_spread_ms") is not None]
    tag = compare_tag(s["compare_env"], s["compare"])
    lines += [f"twin {t['ratio']} = {t['value']:.2f} ({tag})" for t in report["twins"]]
    lines += [f"target {t['ratio']} = {t['value']:.2f} (bar ≥ {t['target']}): "
              f"{'met' if t['met'] else 'NOT met'}" for t in report["targets"]]
    first = next((t for t in report["targets"] if t["ratio"] == "(b) / (a)"), None)
    if first is not None:
        lines.append(f"gan_dist/{s['reference']}: {first['value']:.2f}")
    return "\n".join(lines)


def _thread_env() -> list[str]:
    """The OpenMP/MKL variables this run was given: they change CPU results, so the command shows them."""
    return [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "KMP_", "MKL_"))]


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def _capability(device: str) -> str:
    """What decides the CPU results: the vector ISA torch dispatches to, and whether bf16 is native."""
    if device == "cuda":
        return f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}"
    return f"{torch.backends.cpu.get_cpu_capability()}; {native_bf16(torch.device('cpu'))[1]}"


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` processes that spin on a core each for the duration: other jobs sharing the node."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_parent(args: argparse.Namespace) -> int:
    cfg = worker_config(args)
    info = load_split(cfg.data, ALONE_ON_CPU).info  # fail fast here, and download and convert only once
    reference = reference_of(args, cfg, info)
    cases = plan(args, cfg, info)
    misfit = reference_misfit(reference, cfg, info)
    if misfit:
        print(f"(a) skipped: {misfit}", file=sys.stderr)
    load_before = os.getloadavg()
    results: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    with busy_processes(args.load):
        for round_no in range(args.rounds):
            for case in cases:
                print(f"round {round_no + 1}/{args.rounds}: {case.label}", file=sys.stderr, flush=True)
                results[case.key].append(launch(args, case))
    report = {
        "command": shlex.join([*_thread_env(), *shlex.split(PROG), *sys.argv[1:]]),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device_name": _device_name(args.device), "capability": _capability(args.device),
                    "cores": usable_cores(),
                    "torch": torch.__version__, "load_before": [round(x, 1) for x in load_before],
                    "load_after": [round(x, 1) for x in os.getloadavg()]},
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch": args.batch,
                     "nproc": args.nproc, "device": args.device, "config": str(args.config),
                     "reference": reference,
                     "matmul_size": MATMUL_SIZE[args.device],
                     "overrides": args.overrides, "compare": args.compare, "compare_env": args.compare_env,
                     "background_load": args.load,
                     "data": f"{cfg.data.name} {cfg.data.split} ({cfg.data.root})"},
        "model_flops_per_image": model_flops(cfg, info),
        "cases": [{"key": c.key, "label": c.label, "overrides": list(c.overrides),
                   "summary": summarise(c, results[c.key], results.get("a")), "rounds": results[c.key]}
                  for c in cases],
        "targets": check_targets(reference, args.device, results),
        "twins": twin_ratios(cases, results),
    }
    table = render(report)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report | {"table": table}, indent=1) + "\n")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config of (b) and (c)")
    parser.add_argument("--steps", type=cli.integer(1), default=150, help="timed steps per case and round")
    parser.add_argument("--warmup", type=cli.integer(0), default=20, help="steps dropped before timing")
    parser.add_argument("--rounds", type=cli.integer(1), default=3, help="A B C rounds")
    parser.add_argument("--batch", type=cli.integer(1), default=64, help="batch per rank (train.batch_size)")
    parser.add_argument("--nproc", type=cli.integer(1), default=None,
                        help="ranks of (c); default: GPUs, else cores")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compare", action="append", default=[], metavar="key=value",
                        help="also run (b) and (c) with this override (repeatable: one twin gets them all)")
    parser.add_argument("--compare-env", action="append", default=[], metavar="NAME=VALUE",
                        help="the twin's processes also get this environment variable (repeatable)")
    parser.add_argument("--load", type=cli.integer(0), default=0, metavar="N",
                        help="run every case beside N busy-looping processes: a loaded machine")
    parser.add_argument("--json", default="runs/bench.json", help="report file ('' for none)")
    parser.add_argument("--reference", choices=("auto", "tutorial", "plain"), default="auto",
                        help="case (a): the tutorial's loop, or the config's networks in a plain PyTorch loop; "
                             "auto: the tutorial for its own MLP on data it takes, else plain")
    parser.add_argument("--worker", choices=("ref", "plain", "gan"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    for item in args.compare_env:
        if not item.partition("=")[0] or "=" not in item:
            parser.error(f"--compare-env {item!r}: expected NAME=VALUE")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else usable_cores()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        try:
            return run_worker(args) if args.worker else run_parent(args)
        except CaseFailed as e:
            print(cli.error_line(e), file=sys.stderr)
            return EXIT_FAILED

    return cli.run(body)  # a bad config or missing data: one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
