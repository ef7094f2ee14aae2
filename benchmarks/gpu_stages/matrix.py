"""Stage ``matrix``: every recipe in every dtype the device computes, stepped on it."""

import contextlib
import time
from collections.abc import Iterator

import torch

from benchmarks.gpu_stages.mode import RECIPES, Mode
from benchmarks.gpu_stages.report import Report, guarded, raised
from benchmarks.gpu_stages.run import Run, last_values
from gan_dist.dist import setup

DTYPES = {"cuda": ("bfloat16", "float16", "float32"), "cpu": ("bfloat16", "float32")}
SCALED_DTYPE = {"cuda": "float16", "cpu": "bfloat16"}  # float16 autocast is CUDA only


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
    report.check(f"{name}: losses and weights finite", run.finite(values), last_values(values))
    misplaced = off_device(run)
    report.check(f"{name}: everything on {mode.device}", not misplaced, ", ".join(misplaced[:5]))


def matrix(mode: Mode, report: Report) -> None:
    """Every recipe (benchmarks/gpu_stages/mode.py's RECIPES) in every dtype the device computes, and n_critic=2
    under the GradScaler's dtype, built as the trainer builds it. Checked per combination: the resolved dtype and
    GradScaler, the steps without a host sync (CUDA), losses and weights finite, every tensor on the device."""
    for recipe, dtype, extra in combinations(mode.device):
        guarded(report, f"{case_name(recipe, dtype, extra)}: ran", matrix_case, mode, report, recipe, dtype, extra)
