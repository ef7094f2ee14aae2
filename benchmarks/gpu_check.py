"""The stages of ``benchmarks/gpu_check.sh``, one function each, run one process per stage.

    python -m benchmarks.gpu_check plan    --device cuda --work W --out O data.root=...   # "name timeout" lines
    python -m benchmarks.gpu_check NAME    --device cuda --work W --out O data.root=...   # run one stage
    python -m benchmarks.gpu_check summary --device cuda --work W --out O data.root=...

A stage records checks (pass or fail: they decide the exit status), measurements and speed targets
(reported, never folded into the exit status) in ``W/stages/NAME.json``, saved after every entry so a
stage stopped by its timeout still shows what it did. ``summary`` merges them into ``O/summary.json``.
``--device cpu`` is the CPU mode: the same code on tiny sizes, so CI keeps it from rotting.
"""

# No ``from __future__ import annotations``: DDP checks a comm hook's annotations as live objects.
import argparse
import contextlib
import functools
import json
import math
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from benchmarks import bench
from benchmarks.colour_fashion import write_split
from gan_dist import dist as gan_dist_dist
from gan_dist import evaluate
from gan_dist.config import Config, DataError, DatasetInfo
from gan_dist.configio import load_config
from gan_dist.dist import DistEnv, setup, teardown, usable_cores
from gan_dist.judge import DEFAULT_SPEC, JudgeSpec
from gan_dist.losses import Metrics
from gan_dist.sources import IdxSource
from gan_dist.trainer import build

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass(frozen=True)
class Recipe:
    """A config file (None: the defaults) and overrides on top; ``arch`` is the model.arch they give."""

    config: str | None
    arch: str
    overrides: tuple[str, ...] = ()


# The defaults are the tutorial's recipe (configs/mnist_cgan.yaml's values), so the BatchNorm DCGAN is that
# recipe with conv nets: concat conditioning, BCE, and BatchNorm in D (spectral norm off). It starts from
# the defaults, not from the file: the file's model.mlp section does not apply to model.arch=dcgan.
RECIPES = {
    "mlp": Recipe("configs/mnist_cgan.yaml", "mlp"),
    "dcgan": Recipe("configs/mnist_dcgan.yaml", "dcgan"),
    "dcgan_bn": Recipe(None, "dcgan", ("model.arch=dcgan",)),
}
DROPOUT_OFF = {"mlp": ("model.mlp.d_dropout=0",), "dcgan": ()}  # the DCGAN's D has no dropout
DTYPES = {"cuda": ("bfloat16", "float16", "float32"), "cpu": ("bfloat16", "float32")}
SCALED_DTYPE = {"cuda": "float16", "cpu": "bfloat16"}  # float16 autocast is CUDA only
DDP_OPTIONS = {"mlp": ("mlp", ()), "dcgan": ("dcgan", ()), "dcgan_bn": ("dcgan_bn", ()),
               "mlp_n_critic_2": ("mlp", ("train.n_critic=2",))}
SN_TOLERANCE = 0.05  # relative error of the power-iteration estimate after the stage's steps
CPU_VS_DEVICE = {"loss_rtol": 1e-5, "grad_rtol": 1e-4}  # the gradient one's is relative to the tensor's max
SPEED_BARS = {"x_ref": 30.0, "pct_of_ceiling": 40.0}


@dataclass(frozen=True)
class Sizes:
    """How much each stage runs: the full check on a GPU, or a smoke of the same code on a CPU."""

    batch: int
    model: dict[str, tuple[str, ...]]  # per model.arch, the overrides that shrink its networks
    warmup: int  # steps before the checked ones (lazy initialisation may sync once)
    steps: int  # checked steps per combination, per rank configuration, per sweep point
    resumed: tuple[str, ...]  # recipes of the SIGTERM -> resume comparison; the last one is evaluated
    run_steps: int  # train.max_steps of the entry-point runs
    signal_after: int  # the killed run gets SIGTERM once it logged this step
    log_every: int
    worlds: tuple[int, ...]  # ranks sharing the device over gloo
    agreement_calls: int
    bench: tuple[str, ...]  # benchmarks/bench.py's --steps and --warmup
    sweep: tuple[int, ...]  # batch sizes
    rgb_batch: int  # batch of the RGB recipes' throughput
    n_per_class: int  # evaluated samples per class
    judge: JudgeSpec


SIZES = {
    "cuda": Sizes(batch=64, model={}, warmup=3, steps=20, resumed=("mlp", "dcgan"), run_steps=300, signal_after=20,
                  log_every=10, worlds=(2, 4), agreement_calls=300, bench=("--steps", "200", "--warmup", "30"),
                  sweep=tuple(64 * 2**i for i in range(9)), rgb_batch=256, n_per_class=200, judge=DEFAULT_SPEC),
    "cpu": Sizes(batch=16, model={"mlp": ("model.mlp.g_hidden=[32]", "model.mlp.d_hidden=[32]"),
                                  "dcgan": ("model.dcgan.width=8",),
                                  "resnet": ("model.resnet.g_width=8", "model.resnet.d_width=8")},
                 warmup=1, steps=2, resumed=("mlp",), run_steps=24, signal_after=8, log_every=2, worlds=(2,),
                 agreement_calls=50, bench=("--steps", "1", "--warmup", "0"), sweep=(8, 16), rgb_batch=16,
                 n_per_class=10, judge=JudgeSpec(width=4, features=16, samples=2000, batch_size=32, lr=1e-2)),
}


@dataclass(frozen=True)
class Mode:
    """The device under test, where stages keep their files, where results go, and the data overrides."""

    device: str
    work: Path
    out: Path
    data: tuple[str, ...]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def sizes(self) -> Sizes:
        return SIZES[self.device]

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"

    def argv(self) -> list[str]:
        """The command-line form of this mode, for the stage's own subprocesses."""
        return ["--device", self.device, "--work", str(self.work), "--out", str(self.out), *self.data]

    def model(self, arch: str) -> tuple[str, ...]:
        """The overrides that size networks of ``arch`` for this mode."""
        return self.sizes.model.get(arch, ())

    def overrides(self, recipe: str, *extra: str) -> list[str]:
        """A recipe's overrides, then the mode's data, device, batch and model size, then ``extra``."""
        r = RECIPES[recipe]
        return [*r.overrides, *self.data, f"dist.device={self.device}", f"train.batch_size={self.sizes.batch}",
                *self.model(r.arch), *extra]

    def config_args(self, recipe: str) -> list[str]:
        """``--config FILE`` of the recipe for a command line; none when it starts from the defaults."""
        file = RECIPES[recipe].config
        return ["--config", str(REPO / file)] if file else []

    def config(self, recipe: str, *extra: str) -> Config:
        file = RECIPES[recipe].config
        return load_config(REPO / file if file else None, self.overrides(recipe, *extra))


class Report:
    """What one stage found. Checks decide the exit status; measurements and targets are reported."""

    def __init__(self, stage: str, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"stage": stage, "checks": [], "measured": {}, "targets": [], "notes": [],
                                     "skipped": None}

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.data["checks"])

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        self._save()
        return bool(ok)

    def measure(self, name: str, value: Any) -> None:
        self.data["measured"][name] = value
        print(f"  - {name}: {value}", flush=True)
        self._save()

    def target(self, name: str, value: float, bar: float) -> None:
        met = value >= bar
        self.data["targets"].append({"name": name, "value": value, "bar": bar, "met": met})
        print(f"  target {name} = {value:.2f} (bar >= {bar}): {'met' if met else 'NOT met'}", flush=True)
        self._save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"  note: {text}", flush=True)
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ helpers


def tail(text: str, chars: int = 2000) -> str:
    return text[-chars:].strip()


def line_with(text: str, needle: str) -> str:
    """The first line of ``text`` that holds ``needle``, else its tail: the evidence a check quotes."""
    return next((line for line in text.splitlines() if needle in line), tail(text))


def outcome(proc: subprocess.CompletedProcess, ok: bool, needle: str) -> str:
    """A check's evidence: the line naming the success (none without a needle), or the exit status and the
    tail of the output."""
    if not ok:
        return f"exit {proc.returncode}: {tail(proc.stdout)}"
    return line_with(proc.stdout, needle) if needle else ""


def raised(e: BaseException) -> str:
    """The exception and the innermost frame of gan_dist (or of this file) that it passed through."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if Path(f.filename).parent.name in ("gan_dist", "benchmarks")]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


def guarded(report: "Report", name: str, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)``; an exception becomes the failed check ``name`` and the next case goes on."""
    try:
        fn(*args)
    except Exception as e:
        traceback.print_exc()
        report.check(name, False, raised(e))


def run_cmd(cmd: Sequence[str | Path]) -> subprocess.CompletedProcess:
    """A command in the repository root, its stderr merged into its stdout; the stage's timeout bounds it."""
    return subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


class Run:
    """A run built as the trainer builds it (``gan_dist.trainer.build``) on the mode's device with its real
    data, stepped as ``Trainer.fit`` steps it."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.env = env
        built = build(cfg, env)
        self.cfg, self.info, self.shards, self.engine = built.cfg, built.info, built.data, built.engine
        self.batches = self.shards.epoch(0)
        self.step = 0

    def train(self, steps: int) -> list[Metrics]:
        """``steps`` iterations; their metrics, left on the device (reading them would sync)."""
        metrics = []
        for _ in range(steps):
            reals = [next(self.batches) for _ in range(self.cfg.train.n_critic)]
            metrics.append(self.engine.iteration(self.step, reals))
            self.step += 1
        return metrics

    def read(self, metrics: list[Metrics]) -> dict[str, torch.Tensor]:
        """Each metric the loss names (``engine.loss.names``), over the steps that reported it, on the host;
        one that no step reported (a lazy regularizer between its steps) is left out."""
        return {name: torch.stack([m[name] for m in metrics if name in m]).float().cpu()
                for name in self.engine.loss.names if any(name in m for m in metrics)}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter, buffer and optimizer state tensor the run keeps."""
        eng = self.engine
        modules = {"G": eng.generator, "D": eng.discriminator} | ({"EMA": eng.ema.module} if eng.ema else {})
        for tag, module in modules.items():
            yield from ((f"{tag}.{n}", t) for n, t in [*module.named_parameters(), *module.named_buffers()])
        for tag, opt in (("opt_g", eng.opt_g), ("opt_d", eng.opt_d)):
            for i, state in enumerate(opt.state.values()):
                yield from ((f"{tag}.{i}.{k}", t) for k, t in state.items() if torch.is_tensor(t))


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """On CUDA, any synchronising call (``.item()``, a device-to-host copy, ``nonzero``) raises inside."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, by dotted path."""
    if torch.is_tensor(state):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    return {k: v for key, sub in items for k, v in flat_tensors(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


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


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    """Median wall time of one call, in µs."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


# ------------------------------------------------------------------------------------------------ preflight


def launch_us(device: torch.device, n: int = 2000) -> float:
    """Host µs per launch of a one-element kernel from eager PyTorch: the floor of an eager step."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize(device)
    return 1e6 * (time.perf_counter() - start) / n


def graph_kernel_us(device: torch.device, n: int = 1000) -> float:
    """µs per kernel of the same launch replayed from a CUDA graph: what ``reduce-overhead`` can reach."""
    x = torch.zeros(1, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            x.add_(1)
    graph.replay()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize(device)
    return 1e6 * (time.perf_counter() - start) / n


def preflight(mode: Mode, report: Report) -> None:
    """Versions, the device's speed limits, the data, and what ``amp.dtype=auto`` picks here."""
    report.measure("python", platform.python_version())
    report.measure("torch", torch.__version__)
    if mode.cuda and not report.check("CUDA device visible", torch.cuda.is_available(), "torch sees no GPU"):
        return
    device = torch.device(mode.device)
    if mode.cuda:
        props = torch.cuda.get_device_properties(device)
        report.measure("gpu", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                              f"{torch.cuda.device_count()} visible")
        report.measure("cuda / cudnn / nccl", f"{torch.version.cuda} / {torch.backends.cudnn.version()} / "
                                              f"{'.'.join(map(str, torch.cuda.nccl.version()))}")
        report.measure("bf16 matmul ceiling, TFLOP/s", round(bench.matmul_ceiling(device, torch.bfloat16) / 1e12, 1))
        report.measure("µs per one-element kernel, eager launch", round(launch_us(device), 2))
        report.measure("µs per one-element kernel, CUDA graph replay", round(graph_kernel_us(device), 2))
    else:
        report.measure("cpu", f"{platform.machine()}, {usable_cores()} usable cores")
        report.measure("fp32 matmul ceiling, GFLOP/s", round(bench.matmul_ceiling(device, torch.float32) / 1e9, 1))
    cfg = mode.config("mlp")
    try:
        built = build(cfg, setup(cfg.dist))
    except DataError as e:
        report.check("data present", False, f"{e} (see the header of benchmarks/gpu_check.sh)")
        return
    info = built.info
    report.check("data present", True, f"{info.name} {built.split.name}: {len(built.split)} images, "
                                       f"{info.shape}; {len(built.data)} batches of {cfg.train.batch_size}")
    amp = built.engine.amp
    report.measure("amp.dtype=auto resolves to", f"{amp.dtype} ({amp.reason})")


# ------------------------------------------------------------------------------------------------ correctness


def case_name(recipe: str, dtype: str, extra: tuple[str, ...]) -> str:
    return "/".join([recipe, dtype, *extra])


def combinations(device: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every recipe in every dtype the device computes, plus n_critic=2 under the GradScaler's dtype."""
    combos = [(recipe, dtype, ()) for recipe in RECIPES for dtype in DTYPES[device]]
    return [*combos, ("dcgan", SCALED_DTYPE[device], ("train.n_critic=2",))]


def off_device(run: Run) -> list[str]:
    device = run.env.device.type
    misplaced = [name for name, t in run.tensors() if t.device.type != device]
    resident = getattr(run.shards, "images", None)  # a streamed split is on the host by design
    return misplaced + ([f"split on {resident.device}"] if resident is not None and resident.device.type != device
                        else [])


def matrix_case(mode: Mode, report: Report, recipe: str, dtype: str, extra: tuple[str, ...]) -> None:
    """One combination: the resolved dtype, no host sync in the steps, finite values, all on the device."""
    sizes, name = mode.sizes, case_name(recipe, dtype, extra)
    cfg = mode.config(recipe, f"amp.dtype={dtype}", *extra)
    run = Run(cfg, setup(cfg.dist))
    amp = run.engine.amp
    scaled = amp.scaler.is_enabled()
    report.check(f"{name}: precision", amp.dtype == getattr(torch, dtype) and scaled == (dtype == "float16"),
                 f"{amp.dtype}, GradScaler {'on' if scaled else 'off'} ({amp.reason})")
    run.train(sizes.warmup)  # cuBLAS handles, the allocator and the epoch's index upload may sync once
    start = time.perf_counter()
    try:
        with no_host_sync(run.env.device):
            metrics = run.train(sizes.steps)
    except RuntimeError as e:
        report.check(f"{name}: {sizes.steps} steps without a host sync", False, raised(e))
        return
    values = run.read(metrics)  # the reads, after the loop
    ms = 1e3 * (time.perf_counter() - start) / sizes.steps
    report.check(f"{name}: {sizes.steps} steps" + (" without a host sync" if mode.cuda else ""), True,
                 f"{ms:.2f} ms/step")
    finite = all(bool(torch.isfinite(v).all()) for v in values.values()) and \
        all(bool(torch.isfinite(t).all()) for _, t in run.tensors())
    report.check(f"{name}: losses and weights finite",
                 finite, "last " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in values.items()))
    misplaced = off_device(run)
    report.check(f"{name}: everything on {mode.device}", not misplaced, ", ".join(misplaced[:5]))


def matrix(mode: Mode, report: Report) -> None:
    """Every recipe in every dtype, and n_critic=2 under the GradScaler's dtype."""
    for recipe, dtype, extra in combinations(mode.device):
        guarded(report, f"{case_name(recipe, dtype, extra)}: ran", matrix_case, mode, report, recipe, dtype, extra)


def spectral_norm(mode: Mode, report: Report) -> None:
    """torch's power-iteration estimate in D against the exact largest singular value, after training."""
    cfg = mode.config("dcgan")
    run = Run(cfg, setup(cfg.dist))
    run.train(mode.sizes.warmup + mode.sizes.steps)
    d = run.engine.discriminator.eval()  # eval: reading the weight runs no further power iteration
    with torch.no_grad():
        for name, module in d.named_modules():
            if not hasattr(module, "parametrizations"):
                continue
            parametrization = module.parametrizations.weight
            original = parametrization.original
            estimate = original.norm() / module.weight.norm()  # the weight used is original / estimate
            exact = torch.linalg.matrix_norm(original.movedim(parametrization[0].dim, 0).flatten(1).float(), 2)
            error = float(estimate / exact - 1)
            report.check(f"D.{name}: sigma estimate within {SN_TOLERANCE:.0%}", abs(error) <= SN_TOLERANCE,
                         f"estimate {estimate:.4f}, exact {exact:.4f}, relative error {error:+.2e}")


def fixed_inputs(n: int, z_dim: int, info: DatasetInfo) -> list[torch.Tensor]:
    """Real images and labels, D-step latents and labels, G-step latents and labels; the same on any device."""
    g = torch.Generator().manual_seed(1234)
    real = torch.rand(n, *info.shape, generator=g) * 2 - 1
    z_d, z_g = (torch.randn(n, z_dim, generator=g) for _ in range(2))
    labels, y_d, y_g = (torch.randint(0, max(info.num_classes, 1), (n,), generator=g) for _ in range(3))
    return [real, labels, z_d, y_d, z_g, y_g]


def fixed_step(mode: Mode, recipe: str, device: str) -> dict[str, Any]:
    """One D step and one G step in float32 on fixed inputs, dropout off; losses, gradients and weights."""
    cfg = mode.config(recipe, "amp.dtype=float32", *DROPOUT_OFF[RECIPES[recipe].arch], f"dist.device={device}")
    env = setup(cfg.dist)
    built = build(cfg, env)
    engine = built.engine
    if env.device.type == "cuda":  # after the engine, whatever it sets: this compares true float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    inputs = fixed_inputs(cfg.train.batch_size, cfg.model.z_dim, built.info)
    real, labels, z_d, y_d, z_g, y_g = (t.to(env.device) for t in inputs)
    metrics = engine.d_step(real, labels, z_d, y_d, 0)
    metrics |= engine.g_step(z_g, y_g, 0)  # D is frozen here: its .grad stays the D step's
    names = [n for n in engine.loss.names if n in metrics]
    named = [*(("G." + k, p) for k, p in engine.generator.named_parameters()),
             *(("D." + k, p) for k, p in engine.discriminator.named_parameters())]
    return {"names": names, "losses": torch.stack([metrics[n].float() for n in names]).cpu(), "lr": cfg.optim.d_lr,
            "grads": {k: p.grad.cpu() for k, p in named if p.grad is not None},
            "params": {k: p.detach().cpu() for k, p in named}}


def compare_step(mode: Mode, report: Report, recipe: str) -> None:
    """``fixed_step`` on the CPU (a) against the device (b), from the same seeded initial state."""
    a, b = fixed_step(mode, recipe, "cpu"), fixed_step(mode, recipe, mode.device)
    if not report.check(f"{recipe}: the same metrics reported", a["names"] == b["names"],
                        f"{', '.join(a['names'])} on cpu; {', '.join(b['names'])} on {mode.device}"):
        return
    errors = (a["losses"] - b["losses"]).abs() / a["losses"].abs().clamp_min(1)
    worst = int(errors.argmax())
    report.check(f"{recipe}: losses agree (rtol {CPU_VS_DEVICE['loss_rtol']:g})",
                 float(errors[worst]) <= CPU_VS_DEVICE["loss_rtol"],
                 f"largest relative difference {float(errors[worst]):.2e} in {a['names'][worst]}")
    if not report.check(f"{recipe}: the same gradients exist", a["grads"].keys() == b["grads"].keys(),
                        f"{len(a['grads'])} on cpu, {len(b['grads'])} on {mode.device}"):
        return
    grad_err = {k: float((a["grads"][k] - b["grads"][k]).abs().max() / a["grads"][k].abs().max().clamp_min(1e-30))
                for k in a["grads"]}
    worst = max(grad_err, key=grad_err.get)
    report.check(f"{recipe}: gradients agree ({CPU_VS_DEVICE['grad_rtol']:g} of each tensor's largest)",
                 grad_err[worst] <= CPU_VS_DEVICE["grad_rtol"], f"worst {worst}: {grad_err[worst]:.2e}")
    moved = max(differences(a["params"], b["params"]).values()) / a["lr"]
    report.measure(f"{recipe}: largest weight difference after the Adam steps, in units of lr", round(moved, 4))


def cpu_vs_device(mode: Mode, report: Report) -> None:
    """The same step on the CPU and on the device, fp32, TF32 off. Checked: losses and gradients.
    Adam's first update is about lr * sign(grad), so a weight whose gradient is at rounding level may
    move either way: the weights' largest difference is reported, in units of lr."""
    if not mode.cuda:
        report.note("CPU mode: both sides run on the CPU, which only keeps this stage's code alive")
    for recipe in ("mlp", "dcgan"):
        guarded(report, f"{recipe}: ran", compare_step, mode, report, recipe)


# ------------------------------------------------------------------------------------------------ entry points


def train_args(mode: Mode, recipe: str, run_dir: Path) -> list[str]:
    """gan_dist.train's arguments for a short run with the process group and DDP at world size 1."""
    sizes = mode.sizes
    return [*mode.config_args(recipe), *mode.overrides(recipe), f"run_dir={run_dir}",
            f"train.max_steps={sizes.run_steps}", "checkpoint.every_steps=0", f"log.every_steps={sizes.log_every}",
            "log.wandb.mode=disabled", "log.progress=false", "dist.force_ddp=true", f"dist.backend={mode.backend}"]


def final_checkpoint(mode: Mode, run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{mode.sizes.run_steps}.pt"


def logged_step(metrics: Path) -> int:
    """The highest step in ``metrics.jsonl`` so far (a line being written is skipped)."""
    steps = [0]
    with contextlib.suppress(FileNotFoundError):
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                steps.append(json.loads(line)["step"])
    return max(steps)


def signalled_run(cmd: list[str], metrics: Path, after: int) -> tuple[int, str, bool]:
    """Run ``cmd``, SIGTERM it once it logged step ``after``; (exit status, output, whether it was signalled)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and logged_step(metrics) < after:
            time.sleep(0.01)
        signalled = proc.poll() is None
        if signalled:
            proc.send_signal(signal.SIGTERM)
        proc.wait()
        log.seek(0)
        return proc.returncode, log.read(), signalled


def resume_case(mode: Mode, report: Report, recipe: str) -> None:
    """Uninterrupted under torchrun, against SIGTERM -> 75 -> resume with plain ``python -m``."""
    straight, broken = mode.work / f"{recipe}_straight", mode.work / f"{recipe}_resumed"
    for run_dir in (straight, broken):
        shutil.rmtree(run_dir, ignore_errors=True)
    train = ["-m", "gan_dist.train"]
    proc = run_cmd([*torchrun(1), *train, *train_args(mode, recipe, straight)])
    ok = proc.returncode == 0 and final_checkpoint(mode, straight).exists()
    if not report.check(f"{recipe}: torchrun world 1, {mode.backend} group and DDP (dist.force_ddp)", ok,
                        outcome(proc, ok, "done:")):
        return
    rc, out, signalled = signalled_run([PY, *train, *train_args(mode, recipe, broken)], broken / "metrics.jsonl",
                                       mode.sizes.signal_after)
    evidence = line_with(out, "stopped by signal") if rc == 75 else f"signalled {signalled}, exit {rc}: {tail(out)}"
    if not report.check(f"{recipe}: SIGTERM -> exit 75 with a checkpoint",
                        signalled and rc == 75 and "stopped by signal" in out, evidence):
        return
    proc = run_cmd([PY, *train, *train_args(mode, recipe, broken)])
    ok = proc.returncode == 0 and "resuming from" in proc.stdout
    if not report.check(f"{recipe}: resumed to the end", ok, outcome(proc, ok, "resuming from")):
        return
    diffs = differences(*(flat_tensors(torch.load(final_checkpoint(mode, d), weights_only=True)["engine"], "engine")
                          for d in (straight, broken)))  # format 3: every tensor of a run is its engine's
    unequal = sorted(k for k, v in diffs.items() if v != 0.0)
    worst = max(diffs, key=diffs.get)
    summary = (f"{len(unequal)} of {len(diffs)} tensors differ; largest {diffs[worst]:.3g} in {worst}" if unequal
               else f"all {len(diffs)} tensors equal")
    if recipe == "mlp":
        report.check("mlp: resumed run bitwise equal (torch.equal) to the uninterrupted one", not unequal, summary)
    else:
        report.measure(f"{recipe}: resumed vs uninterrupted", summary)


def resume(mode: Mode, report: Report) -> None:
    """The MLP bitwise; the recommended DCGAN's largest difference is reported (GPU kernels may differ)."""
    for recipe in mode.sizes.resumed:
        guarded(report, f"{recipe}: ran", resume_case, mode, report, recipe)


def evaluate_cmd(mode: Mode) -> list[str]:
    """gan_dist.evaluate's CLI; the CPU mode's judge is a tiny recipe (the default one trains for minutes)."""
    return [PY, "-m", "gan_dist.evaluate"] if mode.cuda else [PY, "-m", "benchmarks.gpu_check", "tiny-evaluate"]


def evaluate_and_sample(mode: Mode, report: Report) -> None:
    """Score the last resumed recipe's checkpoint on the device, then sample it on the CPU."""
    checkpoint = final_checkpoint(mode, mode.work / f"{mode.sizes.resumed[-1]}_straight")
    if not report.check("checkpoint from the resume stage", checkpoint.exists(), str(checkpoint)):
        return
    scores = mode.work / "eval.json"
    proc = run_cmd([*evaluate_cmd(mode), "--checkpoint", checkpoint, "--n-per-class", mode.sizes.n_per_class,
                    "--out", scores, f"eval.judge_dir={mode.work / 'judges'}", f"dist.device={mode.device}",
                    "dist.force_ddp=false", "dist.backend=auto"])
    ok = proc.returncode == 0 and scores.exists()
    if report.check(f"evaluate on {mode.device}", ok, outcome(proc, ok, "")):
        record = json.loads(scores.read_text())
        sane = all(math.isfinite(record[k]) for k in evaluate.METRICS) and 0 <= record["cond_acc"] <= 1
        report.check("evaluate: finite scores", sane, ", ".join(f"{k} {record[k]:.3f}" for k in evaluate.METRICS))
        report.measure("judge accuracy", record["judge_accuracy"])
    grid, npz = mode.out / "samples_grid.png", mode.work / "samples.npz"
    proc = run_cmd([PY, "-m", "gan_dist.sample", "--checkpoint", checkpoint, "--grid", grid, "--npz", npz,
                    "--n-per-class", "10", "--device", "cpu"])
    if report.check(f"sample on the CPU from the {mode.device} checkpoint", proc.returncode == 0,
                    outcome(proc, proc.returncode == 0, "sampling")):
        with np.load(npz) as samples:
            shapes = (samples["images"].shape, samples["images"].dtype, samples["labels"].shape)
        report.check("sample: 100 uint8 images and labels", shapes == ((100, 28, 28), np.uint8, (100,)), str(shapes))


# ------------------------------------------------------------------------------------------------ ranks


def counting_hook(counts: Counter, tag: str) -> Callable:
    """DDP's all-reduce, counted: the proof of which network synchronises in which step."""

    def hook(state: object, bucket: tdist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        counts[tag] += 1
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def mismatches_with_rank0(tensors: list[torch.Tensor], env: DistEnv) -> int:
    """Elements, summed over ranks, that differ from rank 0's."""
    mine = torch.cat([t.detach().flatten() for t in tensors]).cpu()
    theirs = mine.clone()
    tdist.broadcast(theirs, src=0, group=env.control)
    count = torch.tensor([int((mine != theirs).sum())])
    tdist.all_reduce(count, group=env.control)
    return int(count)


def ddp_option(mode: Mode, env: DistEnv, cfg: Config) -> dict[str, int]:
    """The invariants of tests/test_ddp.py with real data sharded by rank: weights equal across ranks,
    and D's gradients never all-reduced in the G step."""
    run = Run(cfg, env)
    eng, counts = run.engine, Counter()
    eng.nets.G.register_comm_hook(None, counting_hook(counts, "G"))
    eng.nets.D.register_comm_hook(None, counting_hook(counts, "D"))
    run.train(mode.sizes.steps)
    before = dict(counts)
    eng.g_step(*eng.noise.draw(run.step, 0, cfg.train.batch_size), run.step)
    weights = [*eng.generator.parameters(), *eng.discriminator.parameters(),
               *(eng.ema.module.parameters() if eng.ema else ())]
    return {"mismatched": mismatches_with_rank0(weights, env), "elements": sum(w.numel() for w in weights),
            "d_total": counts["D"], "d_in_g_step": counts["D"] - before["D"], "g_in_g_step": counts["G"] - before["G"]}


def agreement_cost(env: DistEnv, calls: int) -> dict[str, float]:
    """µs per step of the stop agreement with nothing to hide behind: blocking, and the asynchronous one."""
    env.barrier()
    blocking = per_call_us(lambda: env.any(False), calls)
    agreement = gan_dist_dist.StepAgreement(env)
    env.barrier()
    overlapped = per_call_us(lambda: agreement.exchange(False, False), calls)
    agreement.drain()
    return {"blocking_us": blocking, "async_us": overlapped}


def ddp_worker(mode: Mode) -> int:
    """One rank of the ``ddp_gloo`` stage (under torchrun); rank 0 writes ``ddp_<world>.json``."""
    gloo = ("dist.backend=gloo",)
    env = setup(mode.config("mlp", *gloo).dist)
    try:
        options = {name: ddp_option(mode, env, mode.config(recipe, *gloo, *extra))
                   for name, (recipe, extra) in DDP_OPTIONS.items()}
        mine = {"rank": env.rank, "local_rank": env.local_rank, "device": str(env.device)}
        mine |= agreement_cost(env, mode.sizes.agreement_calls)
        ranks: list[Any] = [None] * env.world_size
        tdist.all_gather_object(ranks, mine, group=env.control)
    finally:
        teardown(env)
    if env.is_main:
        (mode.work / f"ddp_{env.world_size}.json").write_text(json.dumps({"options": options, "ranks": ranks}))
    return 0


def ddp_gloo(mode: Mode, report: Report) -> None:
    """2 (and 4) ranks over gloo on one device: DDP's invariants, placement, and the stop agreement's cost."""
    for world in mode.sizes.worlds:
        result = mode.work / f"ddp_{world}.json"
        result.unlink(missing_ok=True)
        proc = run_cmd([*torchrun(world), "-m", "benchmarks.gpu_check", "ddp-worker", *mode.argv()])
        ok = proc.returncode == 0 and result.exists()
        if not report.check(f"{world} ranks: torchrun exit 0", ok, outcome(proc, ok, "")):
            continue
        found = json.loads(result.read_text())
        for name, r in found["options"].items():
            report.check(f"{world} ranks, {name}: weights bit-identical across ranks", r["mismatched"] == 0,
                         f"{r['mismatched']} of {r['elements']} x {world} elements differ")
            report.check(f"{world} ranks, {name}: D never all-reduced in the G step",
                         r["d_in_g_step"] == 0 and r["g_in_g_step"] > 0 and r["d_total"] > 0,
                         f"D buckets: {r['d_total']} in D steps, {r['d_in_g_step']} in the G step; "
                         f"G buckets in the G step: {r['g_in_g_step']}")
        gpus = torch.cuda.device_count() if mode.cuda else 0
        expected = [f"cuda:{r['local_rank'] % gpus}" if mode.cuda else "cpu" for r in found["ranks"]]
        devices = [r["device"] for r in found["ranks"]]
        report.check(f"{world} ranks: devices are cuda:(local_rank % GPUs)" if mode.cuda else f"{world} ranks: on CPU",
                     devices == expected, ", ".join(devices))
        for key, label in (("blocking_us", "blocking env.any"), ("async_us", "StepAgreement.exchange")):
            values = [r[key] for r in found["ranks"]]
            report.measure(f"{world} ranks: stop agreement, {label}, µs per step (median, slowest rank)",
                           round(max(values), 1))


# ------------------------------------------------------------------------------------------------ throughput


def case_line(summary: dict[str, Any]) -> str:
    return (f"{summary['images_per_s']:.0f} img/s, x(a) {bench._fmt(summary['x_ref'], '.2f')}, "
            f"{summary['step_ms']:.3f} ms/step, {summary['gflop_per_s'] / 1e3:.3g} TFLOP/s ({summary['precision']}), "
            f"first step {summary['first_step_s']:.1f} s")


def run_bench(mode: Mode, report: Report, tag: str, *args: str | Path | int) -> list[dict[str, Any]]:
    """benchmarks/bench.py on one process with the mode's step counts; its cases, each also measured."""
    path = mode.work / f"bench_{tag}.json"
    proc = run_cmd([PY, REPO / "benchmarks" / "bench.py", "--device", mode.device, "--nproc", "1",
                    *mode.sizes.bench, "--rounds", "1", "--json", path, *args])
    ok = proc.returncode == 0 and path.exists()
    if not report.check("bench ran", ok, outcome(proc, ok, "target")):
        return []
    found = json.loads(path.read_text())
    print(found["table"], flush=True)
    for case in found["cases"]:
        report.measure(case["label"], case_line(case["summary"]))
    return found["cases"]


def throughput(mode: Mode, report: Report, compile_mode: str | None = None) -> None:
    """(a) against (b) at the tutorial's batch, eager, and against its twin with ``train.compile``."""
    compare = ["--compare", f"train.compile={compile_mode}"] if compile_mode else []
    cases = run_bench(mode, report, compile_mode or "eager", "--batch", mode.sizes.batch, *compare, *mode.data,
                      *mode.model("mlp"))  # the bench's default config: the MLP recipe
    for case in cases:
        if mode.cuda and case["key"] != "a":
            report.target(f"{case['label']}: x(a)", case["summary"]["x_ref"], SPEED_BARS["x_ref"])


def rgb_throughput(mode: Mode, report: Report, arch: str) -> None:
    """The 32x32 RGB recipe of ``arch`` (configs/cifar10_<arch>.yaml: projection D under spectral norm, hinge,
    EMA) at ``rgb_batch``, on an image folder the stage colours from the mode's data, against the same
    networks in the bench's plain PyTorch loop: img/s, x(a), the step's split and FLOP/s."""
    data = load_config(None, list(mode.data)).data
    folder = mode.work / f"rgb_{arch}"
    n = write_split(IdxSource(data), data.split, 8 * mode.sizes.rgb_batch, np.random.default_rng(0), folder)
    report.note(f"{n} images of {data.name} {data.split}, padded to 32x32 and coloured, in {folder}")
    run_bench(mode, report, f"rgb32_{arch}", "--config", REPO / "configs" / f"cifar10_{arch}.yaml", "--batch",
              mode.sizes.rgb_batch, "--reference", "plain", "data.name=folder", f"data.root={folder}",
              "data.split=train", "data.download=false", *mode.model(arch))



def batch_sweep(mode: Mode, report: Report) -> None:
    """(b) from batch 64 up: TFLOP/s against the matmul ceiling the same process times in the same dtype."""
    rows, best = [], 0.0
    for batch in mode.sizes.sweep:
        work = bench.EngineWorkload(mode.config("mlp", f"train.batch_size={batch}"))
        try:
            r = bench.measure(work, steps=max(2, mode.sizes.steps), warmup=mode.sizes.warmup)
        except torch.cuda.OutOfMemoryError:
            report.note(f"batch {batch}: out of GPU memory; the sweep stops here")
            break
        finally:
            work.close()
        flops, ceiling = r["flops_per_image"] * r["images_per_s"], r["matmul_ceiling_flop_per_s"][r["precision"]]
        rows.append({"batch": batch, "images_per_s": r["images_per_s"], "tflop_per_s": flops / 1e12,
                     "ceiling_tflop_per_s": ceiling / 1e12, "pct_of_ceiling": 100 * flops / ceiling,
                     "precision": r["precision"], "step_ms": r["step_ms"]})
        best = max(best, rows[-1]["pct_of_ceiling"])
        report.measure(f"batch {batch}", f"{r['images_per_s']:.0f} img/s, {flops / 1e12:.3g} TFLOP/s = "
                                         f"{100 * flops / ceiling:.1f}% of {ceiling / 1e12:.3g} ({r['precision']})")
    (mode.work / "bench_sweep.json").write_text(json.dumps(rows, indent=1))
    if mode.cuda and rows:
        report.target("best % of the matmul ceiling", best, SPEED_BARS["pct_of_ceiling"])


# ------------------------------------------------------------------------------------------------ plan and summary


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Mode, Report], None]
    timeout_s: int
    speed: bool = False
    """A speed stage's timeout or skip is reported, not failed; its checks (did it run) still count."""


def bench_stage(compile_mode: str | None, timeout_s: int) -> Stage:
    return Stage(f"throughput_{compile_mode or 'eager'}", functools.partial(throughput, compile_mode=compile_mode),
                 timeout_s, speed=True)


def rgb_stage(arch: str, batch: int, timeout_s: int) -> Stage:
    return Stage(f"throughput_rgb32_{arch}_b{batch}", functools.partial(rgb_throughput, arch=arch), timeout_s,
                 speed=True)


def plan(device: str) -> list[Stage]:
    """The stages in order of importance: when the time budget runs out, the last ones are skipped."""
    cuda = device == "cuda"
    checks = [
        Stage("preflight", preflight, 45 if cuda else 90),
        Stage("matrix", matrix, 75 if cuda else 150),
        Stage("spectral_norm", spectral_norm, 30 if cuda else 90),
        Stage("cpu_vs_device", cpu_vs_device, 30 if cuda else 90),
        Stage("resume", resume, 100 if cuda else 180),
        Stage("evaluate_sample", evaluate_and_sample, 45 if cuda else 150),
        Stage("ddp_gloo", ddp_gloo, 75 if cuda else 150),
    ]
    sweep = Stage("batch_sweep", batch_sweep, 40 if cuda else 90, speed=True)
    rgb = [rgb_stage(arch, SIZES[device].rgb_batch, 75 if cuda else 150) for arch in ("dcgan", "resnet")]
    if not cuda:  # compiling on a small CPU takes minutes; the eager bench keeps the stage's code alive
        return [*checks, sweep, bench_stage(None, 150), *rgb]
    return [*checks, sweep, *rgb, bench_stage("reduce-overhead", 90), bench_stage("default", 75),
            bench_stage("max-autotune", 120)]


def stage_status(entry: dict[str, Any] | None, rc: str | None) -> str:
    """passed | failed | crashed | timed out | skipped (out of time) | not run."""
    if rc is None:
        return "not run"
    if rc == "skipped":
        return "skipped (out of time)"
    if rc in ("124", "137"):
        return "timed out"
    if entry is not None and not all(c["ok"] for c in entry["checks"]):
        return "failed"
    return "passed" if rc == "0" and entry is not None else "crashed"


def fails_exit(stage: Stage, status: str) -> bool:
    return status != "passed" and (not stage.speed or status in ("failed", "crashed"))


def read_stage(mode: Mode, name: str) -> tuple[dict[str, Any] | None, str | None, float]:
    """A stage's report, its exit status and seconds as the shell recorded them ("skipped" when not started)."""
    path, rc_path = mode.work / "stages" / f"{name}.json", mode.work / "stages" / f"{name}.rc"
    entry = json.loads(path.read_text()) if path.exists() else None
    if not rc_path.exists():
        return entry, None, 0.0
    rc, seconds = rc_path.read_text().split()
    return entry, rc, float(seconds)


def summary(mode: Mode) -> int:
    """Merge the stages into ``summary.json`` and ``bench.json`` under OUT; exit 1 if a check failed."""
    rows, failed, targets, ok = [], [], [], True
    for stage in plan(mode.device):
        entry, rc, seconds = read_stage(mode, stage.name)
        status = stage_status(entry, rc)
        ok &= not fails_exit(stage, status)
        checks = (entry or {}).get("checks", [])
        rows.append((entry or {}) | {"stage": stage.name, "kind": "speed" if stage.speed else "check",
                                     "status": status, "seconds": seconds, "timeout_s": stage.timeout_s})
        failed += [f"  {stage.name}: {c['name']}: {c['detail']}" for c in checks if not c["ok"]]
        targets += [t | {"stage": stage.name} for t in (entry or {}).get("targets", [])]
        print(f"{stage.name:<28} {status:<22} {sum(c['ok'] for c in checks):>3}/{len(checks):<3} checks "
              f"{seconds:>5.0f} s")
    if failed:
        print("\n".join(["", "failed checks:", *failed]))
    if targets:
        print("\n".join(["", "speed targets (reported, not part of the exit status):",
                         *(f"  {t['stage']}: {t['name']} = {t['value']:.2f} (bar >= {t['bar']}): "
                           f"{'met' if t['met'] else 'NOT met'}" for t in targets)]))
    (mode.out / "summary.json").write_text(json.dumps({"device": mode.device, "all_checks_passed": ok,
                                                       "stages": rows, "targets": targets}, indent=1) + "\n")
    benches = {p.stem: json.loads(p.read_text()) for p in sorted(mode.work.glob("bench_*.json"))}
    if benches:
        (mode.out / "bench.json").write_text(json.dumps(benches, indent=1) + "\n")
    print(f"\n{'every correctness check passed' if ok else 'SOME CHECKS FAILED'}; results in {mode.out}")
    return 0 if ok else 1


def run_stage(mode: Mode, name: str) -> int:
    """One stage in this process; an exception is a failed check, with its traceback in the log."""
    stage = next(s for s in plan(mode.device) if s.name == name)
    report = Report(name, mode.work / "stages" / f"{name}.json")
    guarded(report, "stage ran to the end", stage.run, mode, report)
    return 0 if report.passed else 1


def parse_args(argv: Sequence[str] | None) -> tuple[str, Mode]:
    stages = sorted({s.name for device in SIZES for s in plan(device)})
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "summary", "ddp-worker", *stages), help="or a stage to run")
    parser.add_argument("--device", choices=tuple(SIZES), default="cuda")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder of the stages")
    parser.add_argument("--out", type=Path, required=True, help="where the results go")
    parser.add_argument("data", nargs="*", metavar="key=value", help="data.* overrides")
    args = parser.parse_intermixed_args(argv)
    return args.command, Mode(args.device, args.work, args.out, tuple(args.data))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tiny-evaluate"]:  # gan_dist.evaluate's CLI with the CPU mode's judge recipe
        return evaluate.main(argv[1:], SIZES["cpu"].judge)
    command, mode = parse_args(argv)
    if command == "plan":
        print("\n".join(f"{s.name} {s.timeout_s}" for s in plan(mode.device)))
        return 0
    if command == "summary":
        return summary(mode)
    return ddp_worker(mode) if command == "ddp-worker" else run_stage(mode, command)


if __name__ == "__main__":
    sys.exit(main())
